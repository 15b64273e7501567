"""`deepseemoe serve RUN [RUN...]`: the explorer, a live web app over run directories."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import typer

from deepseemoe.commands._options import dtype_option, model_device_option, trust_remote_code_option


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        runs: list[Path] = typer.Argument(..., help="Studies (e.g. runs/demo) or routing runs, each after `stats`."),
        port: int = typer.Option(8765, min=0, max=65535, help="Port (0: a free one)."),
        host: str = typer.Option("127.0.0.1", help="Address to bind. Anything but loopback exposes the explorer "
                                                   "(and the model) to the network: a warning is printed."),
        model: str = typer.Option(None, "--model", help="Model for the live views (default: the one each run records)."),
        device: str = model_device_option(),
        dtype: str = dtype_option(),
        max_chars: int = typer.Option(2000, min=1, max=100_000, help="Longest text a request may run."),
        rate: float = typer.Option(2.0, min=0.01, help="Model-backed requests per second per client (bursts of 3×)."),
        trust_remote_code: bool = trust_remote_code_option(),
    ) -> None:
        """Pages for the overview, a typed text's routing, experts, features, the playground (ablate,
        exclude, force experts; ablate or steer a feature), the MoE-vs-dense comparison and search."""
        from rich.console import Console

        from deepseemoe.errors import DeepSeeMoEError

        try:
            import uvicorn

            from deepseemoe.explore.app import Explorer, RateLimit, create_app
            from deepseemoe.explore.http import H11_BUFFER, GuardedH11Protocol
            from deepseemoe.explore.live import Limits
        except ImportError as exc:
            raise DeepSeeMoEError(f"the explorer needs its extra ({exc.name} is missing); "
                                  "pip install 'deepseemoe[serve]'") from None
        console = Console(stderr=True)
        _check_port(host, port)  # before the model loads: a taken port is one error line, not a traceback
        with console.status("opening the runs"):
            explorer = Explorer.open(runs, model=model, device=device, dtype=dtype,
                                     trust_remote_code=trust_remote_code, limits=Limits(max_chars=max_chars),
                                     rate=RateLimit(rate=rate, burst=max(1, int(3 * rate))))
        for key, live in {id(m): (k, m) for k, m in explorer.models.items()}.values():
            with console.status(f"loading {live.model_ref}"):
                try:
                    live.handle  # noqa: B018 - load now, so that the first page does not wait for it
                except (DeepSeeMoEError, OSError) as exc:
                    console.print(f"[yellow]note:[/] the live views of {key} are off: {exc}")
                    explorer.models = {k: m for k, m in explorer.models.items() if m is not live}
        import threading

        threading.Thread(target=explorer.warm, name="warm", daemon=True).start()  # examples, descriptions
        if not is_loopback(host):
            console.print(f"[bold yellow]warning:[/] binding {host}: anyone who can reach this address can read "
                          "these runs and run text through the model. Use 127.0.0.1 unless you mean it.")
        server = uvicorn.Server(uvicorn.Config(create_app(explorer), host=host, port=port, log_level="warning",
                                               http=GuardedH11Protocol, h11_max_incomplete_event_size=H11_BUFFER))
        for key in explorer.studies:
            console.print(f"[green]serving[/] {key}")
        console.print("open the address below; Ctrl-C stops the server")
        _announce(server, host, console)
        server.run()


def _check_port(host: str, port: int) -> None:
    import socket

    from deepseemoe.errors import DeepSeeMoEError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise DeepSeeMoEError(f"--host {host} is not an address of this machine; use 127.0.0.1") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise DeepSeeMoEError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port "
                                  "(0 takes a free one)") from None


def _announce(server, host: str, console) -> None:
    """Print the URL once the socket is bound (port 0 takes a free port, known only then)."""
    original = server.startup

    async def startup(sockets=None):
        await original(sockets=sockets)
        for s in server.servers:
            for sock in s.sockets:
                port = sock.getsockname()[1]
                shown = "127.0.0.1" if host in ("127.0.0.1", "localhost") else host
                print(f"http://{shown}:{port}/", flush=True)
                return

    server.startup = startup
