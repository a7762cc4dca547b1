"""hub: user records over gRPC, every change an event for live subscribers on any instance."""

__version__ = "0.1.0"
