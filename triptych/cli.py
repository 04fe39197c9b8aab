"""The `triptych` command. Each subcommand lives in its package and is imported only when used,
so `triptych --help` stays fast and the SDK never pulls in torch or Ray."""

from __future__ import annotations

import argparse
import importlib
import sys

# name → (module with add_arguments(parser) and run(args) -> int, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("cluster.demo", "start the embedded default cluster, chat with it through the SDK, print timings"),
    "serve": ("cluster.serve", "serve a deploy YAML on a local or existing Ray cluster (gRPC + HTTP)"),
    "generate": ("engine.cli", "offline generation with the colocated engine (no Ray, no server)"),
    "plan": ("placement.cli", "choose per-pool parallelism and instance counts for the most goodput"),
    "profile": ("placement.profiler", "measure the engine and write a profile file for `triptych plan`"),
}
GROUPS: dict[str, dict[str, tuple[str, str]]] = {
    "deploy": {"render": ("cluster.render", "print Ray launcher / KubeRay manifests and `ray start` commands")},
    "admin": {
        "set-role": ("triptych.commands.set_role", "move a worker between the prefill and decode pools"),
        "status": ("triptych.commands.status", "show pools, workers, role switches and restarts"),
    },
}


def _add(sub, name: str, module: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:  # the SDK alone is installed (or a dependency of the server side is missing)
        parser.set_defaults(_run=lambda args, m=exc.name or module: _missing(name, m), _lenient=True)
        return
    mod.add_arguments(parser)
    parser.set_defaults(_run=mod.run)


def _missing(command: str, module: str) -> int:
    print(
        f"triptych {command}: needs the server side, which this installation lacks (no module {module!r}); "
        "install it with: pip install 'triptych[server]'",
        file=sys.stderr,
    )
    return 2


def version() -> str:
    """The installed distribution's version (pyproject.toml), as pip knows it."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("triptych")
    except PackageNotFoundError:
        return "unknown (run from a source tree that is not installed)"


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triptych", description="Disaggregated LLM serving.")
    parser.add_argument("--version", action="version", version=f"triptych {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Only the chosen subcommand's module is imported; the others get a bare entry for --help.
    chosen = argv[0] if argv else None
    for name, (module, help_text) in COMMANDS.items():
        if name == chosen:
            _add(sub, name, module, help_text)
        else:
            sub.add_parser(name, help=help_text)
    for group, members in GROUPS.items():
        gparser = sub.add_parser(group, help=f"{group} commands")
        gsub = gparser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
        for name, (module, help_text) in members.items():
            if group == chosen:
                _add(gsub, name, module, help_text)
            else:
                gsub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "_lenient", False):  # a command that cannot run takes any arguments
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
