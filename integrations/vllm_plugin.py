"""vLLM's plugin hook: makes ``KVStoreConnector`` a connector name vLLM's factory knows, in every process.

vLLM's ``MultiConnector`` rebuilds each child's stats by the child's
registered name alone (``build_kv_connector_stats``), in the front end,
which never builds a connector: with kvstore inside a MultiConnector and
stats logging on, every request failed with ``Connector
'KVStoreConnector' is not registered``. vLLM loads the
``vllm.general_plugins`` entry points (``pyproject.toml``) in the front end
and the engine's processes, before any of that; importing
``kvstore.integrations.vllm`` registers too, where the package is not
installed with its entry points. The registration is lazy: this module
imports nothing of kvstore's connector.
"""

from __future__ import annotations

CONNECTOR = "KVStoreConnector"
MODULE = "kvstore.integrations.vllm"


def register() -> None:
    """Register ``KVStoreConnector`` with vLLM's ``KVConnectorFactory``; a no-op when registered already."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    try:
        KVConnectorFactory.register_connector(CONNECTOR, MODULE, CONNECTOR)
    except ValueError:  # registered already: by this hook, by an import of the connector, or by the user
        pass
