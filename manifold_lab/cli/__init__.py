"""The ``manifold-lab`` command line (typer + rich).

Errors the user can fix (:class:`manifold_lab.errors.ManifoldLabError`) are printed as one red line
on stderr with exit code 2 and no traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from manifold_lab.errors import ManifoldLabError

app = typer.Typer(
    name="manifold-lab",
    help="Is a tokenizer's latent space diffusion-friendly? Measure SSC, LPC, GSQ, eRank and reconstruction.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

err_console = Console(stderr=True)

from manifold_lab.cli import measure as _measure  # noqa: E402,F401  (registers commands)
from manifold_lab.cli import tokenizer_cmds as _tok  # noqa: E402,F401
from manifold_lab.cli import compare as _compare  # noqa: E402,F401
from manifold_lab.cli import diffusion_cmds as _diffusion  # noqa: E402,F401
from manifold_lab.cli import study_cmds as _study  # noqa: E402,F401


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (also ``torchrun -m manifold_lab.cli``)."""
    clean = False
    try:
        code = app(args=argv, standalone_mode=False)  # non-standalone click returns typer.Exit's code
        clean = not (isinstance(code, int) and code != 0)
        if not clean:
            sys.exit(code)
    except ManifoldLabError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click's usage errors arrive here in non-standalone mode
        click_error, abort = _click_exception_types()
        if isinstance(exc, click_error):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, abort):
            sys.exit(1)
        raise
    finally:
        _leave_process_group(clean)


def _leave_process_group(clean: bool) -> None:
    """Under torchrun, leave the process group before exit (a barrier first only when the command
    succeeded: a failed rank must not wait for peers that may never come). Torch is not imported
    just for this: a command that never loaded it has no process group."""
    if "torch" in sys.modules:
        from manifold_lab import distributed

        distributed.shutdown(wait=clean)


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """Click's ClickException and Abort classes: typer >= 0.25 vendors click as ``typer._click``."""
    errors: list[type] = []
    aborts: list[type] = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            mod = __import__(module, fromlist=["ClickException"])
        except ImportError:
            continue
        for found, name in ((errors, "ClickException"), (aborts, "Abort")):
            if isinstance(getattr(mod, name, None), type):
                found.append(getattr(mod, name))
    return tuple(errors), tuple(aborts)
