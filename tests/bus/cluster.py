"""A nats-server that the failure tests restart on the same ports, with the same or a fresh store.

(The three-node cluster is ``voicectl.local.NatsCluster``, which ``make cluster`` runs too.)
"""

from __future__ import annotations

from pathlib import Path

from voicectl.local import NatsServer, free_port


class RestartableNats:
    """One nats-server that can be stopped and started again on the same client and monitoring ports.

    Args:
        store_dir: Its first JetStream store.
    """

    def __init__(self, store_dir: Path) -> None:
        self.port = free_port()
        self.monitor_port = free_port()
        self.store_dir = store_dir
        self._server: NatsServer | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, store_dir: Path | None = None) -> RestartableNats:
        """Starts the server, in ``store_dir`` when given (a fresh store), else in the last one."""
        if store_dir is not None:
            self.store_dir = store_dir
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._server = NatsServer(self.port, self.monitor_port, str(self.store_dir)).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def restart(self, store_dir: Path | None = None) -> None:
        """Stops the server and starts it again on the same ports (see :meth:`start`)."""
        self.stop()
        self.start(store_dir)
