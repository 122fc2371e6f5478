"""The reference client: one I/O-free core, a blocking `Client` and an `AsyncClient` on top of it."""

from protocols.client.aio import AsyncClient
from protocols.client.sync import Client

__all__ = ["AsyncClient", "Client"]
