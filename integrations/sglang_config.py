"""The kvstore HiCache backend's settings: ``extra_config``, ``$KVSTORE_CONFIG`` and ``KVSTORE_*``, with the
defaults an L3 under SGLang's own host pool needs (``l3_defaults``) and a data directory per rank."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
from collections.abc import Mapping
from typing import IO, Any

import torch

from kvstore import StoreConfig
from kvstore.config import ENV_OTHER_PREFIXES, ENV_PREFIX, ENV_RESERVED, env_values, read_settings_file
from kvstore.integrations.model_identity import bind_engine_settings, default_model_id
from kvstore.tiers.lmdb import DirectoryInUseError

log = logging.getLogger(__name__)

# extra_config keys SGLang itself (or another backend sharing the config) reads: ignored here.
# (SGLang's scheduler drops its prefetch knobs before it builds a backend; its PD decode side passes them on.)
SGLANG_KEYS = frozenset({"backend_name", "module_path", "class_name", "interface_v1", "tp_lcm_size",
                         "extra_backend_tag", "enable_storage_metrics", "prefetch_threshold", "prefetch_timeout_base",
                         "prefetch_timeout_per_ki_token", "hicache_storage_pass_prefix_keys"})
SHARED_TIERS = ("files_dir", "remote_url", "redis_url")  # tiers every rank of a node (or nodes) reads
# extra_config keys of this backend that are not StoreConfig fields.
OWN_KEYS = frozenset({"kvstore_config", "salt", "kv_cache_dtype"})
# SGLang's --kv-cache-dtype values whose pages its host pool holds as plain bytes (uint8): the format is in the key.
# SGLang's --kv-cache-dtype values of caches its host pool holds as bytes, and other spellings of them: one name a
# format, so engines that spell it otherwise share pages, and only formats alike do.
FP8_FORMATS = frozenset({"fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "mxfp8", "nvfp4", "fp4_mx_block16"})
_FORMAT_ALIASES = {"fp8_e4m3fn": "fp8_e4m3"}
_STORE_FIELDS = frozenset(f.name for f in dataclasses.fields(StoreConfig))
LOWER_TIERS = ("disk_dir", "files_dir", "remote_url", "redis_url")  # the tiers an L3 keeps pages in

def store_config_from(storage_config: Any,
                      environ: Mapping[str, str] | None = None) -> tuple[StoreConfig, str | None]:
    """The ``StoreConfig`` and extra salt of a backend (precedence in the module docstring), with the L3
    defaults of ``l3_defaults`` for the settings nobody gave."""
    environ = os.environ if environ is None else environ
    extra = dict(storage_config.extra_config or {})
    unknown = sorted(set(extra) - SGLANG_KEYS - OWN_KEYS - _STORE_FIELDS)
    if unknown:
        raise ValueError(f"extra_config: unknown setting(s) {unknown} for the kvstore HiCache backend; expected "
                         f"StoreConfig fields {sorted(_STORE_FIELDS)}, {sorted(OWN_KEYS)} or SGLang's "
                         f"{sorted(SGLANG_KEYS)}")
    fields = {k: v for k, v in extra.items() if k in _STORE_FIELDS}
    path = extra.get("kvstore_config")
    if path is not None and (not isinstance(path, str) or not path):
        raise ValueError(f"extra_config['kvstore_config']: expected a path to a TOML or YAML file, got {path!r}")
    if path is not None and not os.path.isfile(path):
        raise ValueError(f"extra_config['kvstore_config']: expected a readable TOML or YAML file, got {path!r} "
                         f"(no such file)")
    config = StoreConfig.load(path, environ)
    if fields:
        config = StoreConfig.from_dict({**dataclasses.asdict(config), **fields}, source="extra_config")
    path = path if path is not None else environ.get("KVSTORE_CONFIG")
    given = set(fields) | set(env_values(StoreConfig, environ, ENV_PREFIX, ENV_RESERVED, ENV_OTHER_PREFIXES))
    if path:
        given |= set(read_settings_file(path, "kvstore"))
    config = l3_defaults(config, given, environ)
    c = storage_config
    if getattr(c, "is_mla_model", False) and c.tp_size > 1 and not any(getattr(config, n) for n in SHARED_TIERS):
        raise ValueError(f"extra_config: an MLA model at tp_size {c.tp_size} needs a tier every rank reads "
                         f"({', '.join(SHARED_TIERS)}): SGLang stores its pages from TP rank 0 only and takes "
                         f"the least hit over the ranks, so a rank-local L3 (disk_dir, host_bytes) never serves one")
    if getattr(c, "is_mla_model", False) and c.tp_size > 1:
        config = _mla_shared_at_once(config)
    replica = c.dp_rank or _replica()
    if config.disk_dir is not None and (c.tp_size * c.pp_size * c.attn_cp_size > 1 or replica > 0):
        # One LMDB environment per process (its directory is locked): each rank gets its own under disk_dir.
        # With DP attention every DP rank's attention group counts TP ranks from 0: the DP rank tells them apart.
        rank = f"rank-tp{c.tp_rank}of{c.tp_size}-pp{c.pp_rank}of{c.pp_size}-cp{c.attn_cp_rank}of{c.attn_cp_size}"
        if replica > 0:
            rank = f"rank-dp{replica}-" + rank.removeprefix("rank-")
        config = config.replace(disk_dir=os.path.join(config.disk_dir, rank))
    config = config.replace(model_id=model_id_for(storage_config.model_name,
                                                  None if config.model_id == StoreConfig.model_id else config.model_id))
    salt = extra.get("salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise ValueError(f"extra_config['salt']: expected a non-empty string, got {salt!r}")
    return config, salt


def model_id_for(model_name: str | None, named: str | None) -> str:
    """The store's model id: ``named`` (configured), else a digest of the weights SGLang loads, beside the
    name SGLang keys pages on (its served name, tagged with its host pool's page format); bound to the
    settings that change the KV those weights compute (``--json-model-override-args``, ``--quantization``).

    SGLang's name is the model path by default: a new checkpoint written at
    the same path was served the old one's pages from a persistent L3.
    """
    args = _server_args()
    path = getattr(args, "model_path", None)
    if not path and model_name and os.path.isdir(model_name):
        path = model_name  # a backend built without SGLang's server args: its name is the model folder
    if named is not None:
        base = named
    elif path:
        weights = default_model_id(path, getattr(args, "revision", None))
        base = weights if model_name in (None, "", path) else f"{weights}|{model_name}"
    elif model_name:
        log.warning("SGLang gave no model path to digest the weights of: pages are keyed by the model name "
                    "%r alone; set model_id if other weights are ever served under that name", model_name)
        base = model_name
    else:
        base = StoreConfig.model_id
    overrides = getattr(args, "json_model_override_args", None)
    if isinstance(overrides, str):
        try:
            overrides = json.loads(overrides or "{}")
        except ValueError:
            pass  # SGLang refuses it itself; bound as given
    return bind_engine_settings(base, {"model_override_args": overrides,
                                       "quantization": getattr(args, "quantization", None)})


def served_kv_format() -> str | None:
    """SGLang's ``--kv-cache-dtype`` in this process (``auto``: the checkpoint's own, which the weights' digest
    covers), tagged on ROCm, whose e4m3 is another format; None without server arguments."""
    try:  # the resolved value: SGLang's model overrides may pick a format for --kv-cache-dtype auto
        from sglang.srt.runtime_context import get_model
        value = get_model().kv_cache_dtype
    except Exception:  # an SGLang without config bags, or none published
        value = getattr(_server_args(), "kv_cache_dtype", None)
    if not isinstance(value, str) or not value:
        return None
    return f"{value}/hip" if getattr(torch.version, "hip", None) else value


# The shared tiers' settings by StoreConfig prefix: files_dir -> files_*, remote_url -> remote_*, redis_url -> redis_*.
_SHARED_PREFIXES = {"files_dir": "files", "remote_url": "remote", "redis_url": "redis"}


def _mla_shared_at_once(config: StoreConfig) -> StoreConfig:
    """An MLA model at TP > 1: SGLang backs each page up from TP rank 0 only, once, and takes the least hit
    over the ranks; a page a shared tier admits only when seen again, or takes only on eviction, or drops
    from a full queue, is held by rank 0 alone, and no rank is ever served it. The shared tiers take every
    page at once (admitted at first sight, written through, a full queue waited for)."""
    changes: dict[str, Any] = {}
    for tier, prefix in _SHARED_PREFIXES.items():
        if getattr(config, tier):
            if getattr(config, f"{prefix}_admit_after") != 1:
                changes[f"{prefix}_admit_after"] = 1
            if config.tier_write_policy(prefix) != "write_through":
                changes[f"{prefix}_write_policy"] = "write_through"
    if changes and config.queue_full != "block":
        changes["queue_full"] = "block"
    if changes:
        log.warning("kvstore HiCache backend: an MLA model at TP > 1 is backed up from TP rank 0 only, so the "
                    "tiers every rank reads take its pages at once: %s", changes)
        config = config.replace(**changes)
    return config


def weight_version() -> str | None:
    """SGLang's published weight version in this process (``update_weights_*`` calls that carry one move it),
    or None: an SGLang without config bags, or none published (a backend built by hand)."""
    try:
        from sglang.srt.runtime_context import get_serving
        return str(get_serving().weight_version)
    except Exception:
        return None


_L3_SLOTS = 64  # default L3 directories one node's engines may take: sglang-l3, sglang-l3-1, ...


def claim_l3(config: StoreConfig, environ: Mapping[str, str]) -> tuple[StoreConfig, IO[str] | None]:
    """``config`` with the default L3 (``disk_dir`` of ``l3_defaults``, or a rank's directory under it) this
    engine holds: the first of ``sglang-l3``, ``sglang-l3-1``, ... no other engine of the node holds, claimed
    by an flock on ``<directory>.engine`` that the returned file keeps (close it to let go). A second server
    on one node failed to start on the first's directory. A ``disk_dir`` given elsewhere is returned as it is.

    Chosen once, before any store opens: every pool of the engine (its KV pool, a hybrid model's others,
    a flat anchor's) opens under the same directory.
    """
    default = default_l3_dir(environ)
    disk_dir = config.disk_dir
    if disk_dir is None or (disk_dir != default and os.path.dirname(disk_dir) != default):
        return config, None
    rank = os.path.relpath(disk_dir, default) if disk_dir != default else ""
    for n in range(_L3_SLOTS):
        base = f"{default}-{n}" if n else default
        candidate = os.path.join(base, rank) if rank else base
        os.makedirs(os.path.dirname(candidate), exist_ok=True)
        claim = open(candidate + ".engine", "a+")
        try:
            fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            claim.close()
            continue
        if n:
            log.info("kvstore HiCache backend: the default L3 is another engine's; this one keeps its pages in %s",
                     candidate)
        return config.replace(disk_dir=candidate), claim
    raise DirectoryInUseError(f"disk_dir: the default L3 {disk_dir} and {_L3_SLOTS - 1} more are held by other "
                              "engines of this node: give disk_dir")


def _server_args() -> Any:
    """SGLang's server arguments in this process, or None (a backend built by hand, an SGLang without them)."""
    try:
        from sglang.srt.runtime_context import get_server_args
        return get_server_args()
    except Exception:
        return None


def _replica() -> int:
    """This process's data-parallel replica, where SGLang's storage config does not say (it sets ``dp_rank`` under
    DP attention only): replicas of one node otherwise opened one LMDB directory, and the second did not start."""
    try:
        from sglang.srt.runtime_context import get_parallel
        return int(get_parallel().dp_rank or 0)
    except Exception:  # an SGLang without it, or no parallel state (tests that build a backend by hand)
        return 0


def default_l3_dir(environ: Mapping[str, str]) -> str:
    """Where the L3's pages go when no tier below host RAM is configured: ``$XDG_CACHE_HOME/kvstore/sglang-l3``."""
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kvstore", "sglang-l3")


def l3_defaults(config: StoreConfig, given: set[str], environ: Mapping[str, str]) -> StoreConfig:
    """kvstore as SGLang's L3: SGLang already keeps every page it serves in its own pinned host pool (L2) on
    each rank, so a kvstore host tier would hold the same pages in RAM twice. Unless ``host_bytes`` is
    given, the store has no host tier (reads and writes go to the tiers below it), and if no tier below
    host RAM is given either (``disk_dir``, ``files_dir``, ``remote_url``, ``redis_url``), pages go to the
    local disk under ``default_l3_dir``. A ``host_bytes`` given alone is a host-only L3, as asked."""
    changes: dict[str, Any] = {}
    if "host_bytes" not in given:
        changes["host_bytes"] = 0
        if not any(getattr(config, name) for name in LOWER_TIERS):
            changes["disk_dir"] = default_l3_dir(environ)
    return config.replace(**changes) if changes else config


def kv_format(extra: Mapping[str, Any]) -> str | None:
    """``extra_config["kv_cache_dtype"]``: the fp8/fp4 format of pages SGLang's host pool holds as bytes."""
    value = extra.get("kv_cache_dtype")
    value = _FORMAT_ALIASES.get(value, value) if isinstance(value, str) else value
    if value is not None and value not in FP8_FORMATS:
        raise ValueError(f"extra_config['kv_cache_dtype']: expected one of {sorted(FP8_FORMATS)} (SGLang's "
                         f"--kv-cache-dtype of a byte-stored cache), got {extra.get('kv_cache_dtype')!r}")
    return value


def settled_kv_format(given: str | None, served: str | None) -> str:
    """The format to key byte-stored pages by: SGLang's own ``--kv-cache-dtype`` (``served``) where it says
    one, which ``extra_config["kv_cache_dtype"]`` (``given``) must then name too; else ``given``. A
    ``ValueError`` naming ``kv_cache_dtype`` when they disagree (an e5m2 engine whose extra_config still said
    e4m3 read e4m3 pages as its own) or nothing names one."""
    if served is None:
        if given is None:
            raise ValueError("SGLang's host pool holds this model's KV as bytes (an fp8 or fp4 --kv-cache-dtype) "
                             "and no server arguments say which format: set extra_config kv_cache_dtype to it "
                             f"({', '.join(sorted(FP8_FORMATS))})")
        return given
    name, tag, platform = served.partition("/")
    served = _FORMAT_ALIASES.get(name, name) + tag + platform
    if given is not None and given != _FORMAT_ALIASES.get(name, name):
        raise ValueError(f"extra_config['kv_cache_dtype']: expected SGLang's own --kv-cache-dtype {name!r} (or "
                         f"nothing), got {given!r}: the pages would be keyed as another format than they hold")
    return served
