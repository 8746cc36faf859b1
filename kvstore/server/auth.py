"""Shared-secret tokens, each naming a namespace (a tenant) and its byte quota.

Tokens come from a tokens file (TOML or YAML)::

    [tenants.team-a]
    token = "a long random secret"
    quota = "8GiB"          # optional; 0 or absent: no quota
    operator = true         # optional: STATS also shows the whole server's figures

A tenant sees only its own namespace; the server's totals (which say what
others hold) go to operator tenants only. The single ``token`` (and an
unauthenticated loopback server) is its server's operator: it is alone.

or a single ``token`` setting (``KVSTORE_SERVER_TOKEN``) for the namespace
``default``. A presented token is compared with every known token in
constant time (``hmac.compare_digest``, no early exit), so the reply time
says nothing about how close a guess was.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvstore.config import read_settings_file
from kvstore.sizes import parse_size

NAMESPACE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DEFAULT_NAMESPACE = "default"
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class Tenant:
    namespace: str
    token: str
    quota_bytes: int = 0
    operator: bool = False

    def __post_init__(self) -> None:
        if not NAMESPACE_PATTERN.fullmatch(self.namespace):
            raise ValueError(f"namespace: expected letters, digits, '_', '.', '-' (at most 64), "
                             f"got {self.namespace!r}")
        if not isinstance(self.token, str):  # its value is never shown: a secret, even a malformed one
            raise ValueError(f"token of namespace {self.namespace!r}: expected a string of at least "
                             f"{MIN_TOKEN_CHARS} characters, got a {type(self.token).__name__}")
        if len(self.token) < MIN_TOKEN_CHARS:
            raise ValueError(f"token of namespace {self.namespace!r}: expected at least {MIN_TOKEN_CHARS} "
                             f"characters, got {len(self.token)}")


class Authenticator:
    """Maps tokens to tenants. With ``open_namespace`` set, any token (or none) maps to it (loopback only)."""

    def __init__(self, tenants: Sequence[Tenant], open_namespace: str | None = None):
        names = [t.namespace for t in tenants]
        if len(set(names)) != len(names):
            raise ValueError(f"tenants: expected one token per namespace, got namespaces {names}")
        _check_distinct_tokens(tenants, "tenants")
        self._tenants = list(tenants)
        self._quotas = {t.namespace: t.quota_bytes for t in tenants}
        self._open = Tenant(open_namespace, "-" * MIN_TOKEN_CHARS, operator=True) if open_namespace else None

    def authenticate(self, token: str) -> Tenant | None:
        """The tenant whose token this is, or None. Takes the same time whichever token matches."""
        presented = token.encode()
        found = None
        for tenant in self._tenants:
            if hmac.compare_digest(presented, tenant.token.encode()):
                found = tenant
        return found or self._open

    def quota_of(self, namespace: str) -> int:
        """The namespace's byte quota (0: none)."""
        return self._quotas.get(namespace, 0)

    @property
    def tenants(self) -> list[Tenant]:
        return list(self._tenants)


def _check_distinct_tokens(tenants: Sequence[Tenant], where: str) -> None:
    """``ValueError`` naming the tenants (never the token) if two share a token."""
    seen: dict[str, str] = {}
    for tenant in tenants:
        if tenant.token in seen:
            raise ValueError(f"{where}: expected a distinct token per tenant, got the same token for tenants "
                             f"{seen[tenant.token]!r} and {tenant.namespace!r}")
        seen[tenant.token] = tenant.namespace


_YAML_WHERE = re.compile(r"line \d+, column \d+")


def load_tenants(path: str | os.PathLike[str]) -> list[Tenant]:
    """Tenants of a tokens file (see the module docstring); ``ValueError`` naming the file, the tenant and
    what is wrong, and never a token's value."""
    try:
        values = read_settings_file(path, "tenants")
    except ValueError as error:
        message = str(error)
        if "not valid YAML" in message:  # YAML's own message quotes the offending line: it may hold a token
            where = _YAML_WHERE.findall(message)
            raise ValueError(f"{path}: not valid YAML" + (f" (at {where[-1]})" if where else "")) from None
        raise
    if "tenants" in values and isinstance(values["tenants"], Mapping):
        values = values["tenants"]
    tenants = []
    for namespace, entry in values.items():
        if not isinstance(entry, Mapping) or "token" not in entry:
            got = f"settings {sorted(map(str, entry))}" if isinstance(entry, Mapping) else \
                f"a {type(entry).__name__}"  # not the value: it may be the token itself
            raise ValueError(f"{path}: tenant {namespace!r}: expected a table with a token, got {got}")
        unknown = sorted(set(entry) - {"token", "quota", "operator"})
        if unknown:
            raise ValueError(f"{path}: tenant {namespace!r}: unknown setting(s) {unknown}; expected token, quota, "
                             f"operator")
        operator = entry.get("operator", False)
        if not isinstance(operator, bool):
            raise ValueError(f"{path}: tenant {namespace!r}: operator: expected true or false, got {operator!r}")
        try:
            tenants.append(Tenant(str(namespace), entry["token"], parse_size(entry.get("quota", 0), "quota"),
                                  operator))
        except ValueError as error:  # a bad namespace, a short token, a bad quota: say which file and tenant
            raise ValueError(f"{path}: tenant {namespace!r}: {error}") from None
    if not tenants:
        raise ValueError(f"{path}: expected at least one tenant, got none")
    _check_distinct_tokens(tenants, str(path))
    return tenants


def default_token(data_dir: str | os.PathLike[str]) -> str:
    """The token kept in ``data_dir/token`` (created, mode 0600, on first use), so a restart keeps it."""
    path = Path(data_dir) / "token"
    if path.exists():
        token = path.read_text().strip()
        if len(token) >= MIN_TOKEN_CHARS:
            return token
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a file that already existed keeps its mode otherwise
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token

