"""Running the emulator: in a background thread of the calling process
(``EmulatorServer``, for tests, the demo and the stack) or as its own process
(``python -m preshard_dev.emulator``, for benchmarks), and a kubeconfig pointing at it."""

from __future__ import annotations

import argparse
import asyncio
import copy
import threading
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from preshard_dev.emulator.errors import ApiError
from preshard_dev.emulator.http import Emulator


def kubeconfig(url: str, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "preshard-emulator", "cluster": {"server": url}}],
        "users": [{"name": "preshard-emulator", "user": {"token": "emulator"}}],
        "contexts": [
            {
                "name": "preshard-emulator",
                "context": {
                    "cluster": "preshard-emulator",
                    "user": "preshard-emulator",
                    "namespace": namespace,
                },
            }
        ],
        "current-context": "preshard-emulator",
    }


class EmulatorServer:
    """Runs the emulator in a background thread with its own event loop."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self.emulator = Emulator()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> EmulatorServer:
        self._thread = threading.Thread(target=self._run, name="k8s-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(20):
            raise TimeoutError("the Kubernetes API emulator did not start")
        if self._error:
            raise self._error
        return self

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as exc:  # surfaced to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        self._runner = web.AppRunner(
            self.emulator.app, handle_signals=False, access_log=None, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self.loop is None:
            return
        loop = self.loop

        async def shutdown() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
            # open watches are long-running handlers: end them instead of abandoning them
            current = asyncio.current_task()
            pending = [t for t in asyncio.all_tasks() if t is not current]
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        fut = asyncio.run_coroutine_threadsafe(shutdown(), loop)
        try:
            fut.result(timeout=10)
        except Exception:  # noqa: S110 - best-effort shutdown
            pass
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.loop = None

    def call(self, coro: Any) -> Any:
        """Run a coroutine on the emulator's loop from another thread."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def apply_file(self, path: Path | str) -> list[dict[str, Any]]:
        """Create every document of a YAML file (setup helper)."""
        out = []
        for doc in yaml.safe_load_all(Path(path).read_text()):
            if doc:
                out.append(self.create_object(doc))
        return out

    def create_object(self, doc: dict[str, Any]) -> dict[str, Any]:
        group, _, version = doc["apiVersion"].rpartition("/")
        rt = next(
            (
                t
                for t in self.emulator.store.types.values()
                if t.group == group and t.version == version and t.kind == doc["kind"]
            ),
            None,
        )
        if rt is None:
            raise ApiError(404, "NotFound", f"no resource for {doc['apiVersion']} {doc['kind']}")
        ns = (doc.get("metadata") or {}).get("namespace")
        return dict(self.call(self.emulator.objects.create(rt, ns, copy.deepcopy(doc), {})))

    def write_kubeconfig(self, path: Path | str, namespace: str = "default") -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(yaml.safe_dump(kubeconfig(self.url, namespace)))
        return p

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _serve_forever(args: argparse.Namespace) -> None:  # pragma: no cover - CLI
    emu = Emulator()
    runner = web.AppRunner(emu.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}"
    for crd in args.crd or []:
        for doc in yaml.safe_load_all(Path(crd).read_text()):
            if doc:
                await emu.objects.create(
                    emu.store.types[("apiextensions.k8s.io", "customresourcedefinitions")],
                    None,
                    doc,
                    {},
                )
    if args.kubeconfig:
        Path(args.kubeconfig).write_text(yaml.safe_dump(kubeconfig(url)))
    print(url, flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - CLI
    p = argparse.ArgumentParser(
        prog="python -m preshard_dev.emulator",
        description="Kubernetes API emulator on 127.0.0.1 (dev only)",
    )
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--kubeconfig", help="write a kubeconfig pointing at the emulator")
    p.add_argument("--crd", action="append", help="CRD file(s) to install at start")
    args = p.parse_args(argv)
    try:
        asyncio.run(_serve_forever(args))
    except KeyboardInterrupt:
        pass
    return 0
