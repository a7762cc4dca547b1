"""hub: user records over gRPC, every change an event for live subscribers on any instance.

How a request flows, and how an event reaches a stream:

    client ──gRPC──▶ hub.rpc  (the edge: servicers, wire <-> domain, auth, access log,
                     │          errors -> statuses in one place; the only server code that
                     │          imports grpc or the generated hub.api)
                     ▼
                 hub.commands (validated writes on domain values; hub.validation holds every
                     │          field rule)
                     ▼
                 hub.store    (the Store contract: memory, or Redis where every write is ONE
                     │          Lua call that changes the records, appends the event to its
                     ▼          partition's history and publishes it)
                   Redis
                     │ pub/sub (one subscription per process)
                     ▼
                 hub.fanout   (the engine: routes each event once to bounded subscriptions,
                     │          repairs gaps from the history, tells a replaced history apart;
                     │          hub.replay shares history reads between resuming streams)
                     ▼
                 hub.rpc.streams ──▶ Sync / UserUpdates responses (one writer per stream)

The core (everything outside hub.rpc, hub.client, hub.cli and hub.api) knows no gRPC: the
import-linter contracts in pyproject.toml check it.
"""

__version__ = "0.1.0"
