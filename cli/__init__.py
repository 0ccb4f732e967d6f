"""The ``sensq`` command line: a click group. The only place in sensq that prints.

User errors (:class:`sensq.errors.SensqError`) become one line on stderr and a non-zero exit code
(1 failure, 2 usage), never a traceback.
"""

from __future__ import annotations

import sys

import click

import sensq
from sensq.errors import SensqError


def _quiet_h5py_teardown(unraisable) -> None:
    """After a failed HDF5 write (a full disk) h5py's object destructors complain while the error is being
    reported ("slist already enabled?"); the one error line has said what happened."""
    if isinstance(unraisable.exc_value, RuntimeError) and "h5py" in repr(unraisable.object):
        return
    sys.__unraisablehook__(unraisable)


_OPTIONAL_INTEGRATION_LOGGERS = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")


def _quiet_optional_integrations() -> None:
    """With torchao installed (the ``export`` extra), importing diffusers imports it, and torchao, torch and
    diffusers log warnings about torchao's CUDA-only libraries on every command (``Failed to load
    _C_mxfp8...so``, ``Unable to import torchao Tensor objects``): noise about an integration sensq does not
    use there. Their errors still show."""
    import logging

    for name in _OPTIONAL_INTEGRATION_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        from sensq.store.interrupts import note_interrupts

        note_interrupts()  # a Ctrl-C that a library swallows still stops the command before it writes
        sys.unraisablehook = _quiet_h5py_teardown
        _quiet_optional_integrations()
        try:
            return super().invoke(ctx)
        except SensqError as error:
            raise _one_line(str(error), error.exit_code) from None
        except KeyboardInterrupt:
            raise _one_line("interrupted; what was complete is kept (outputs are written atomically): run the same "
                            "command again to resume", 130) from None
        except OSError as error:
            if error.errno is None:  # not an operating-system error with a cause we can name: a real bug
                raise
            from sensq.store.files import describe_os_error

            raise _one_line(describe_os_error(error, error.filename or "the output"), 1) from None


def _one_line(message: str, exit_code: int) -> click.ClickException:
    exc = click.ClickException(message.strip().splitlines()[0] if message.strip() else "failed")
    exc.exit_code = exit_code
    return exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(sensq.__version__, prog_name="sensq")
@click.option("--threads", type=click.IntRange(min=1), default=None, envvar="SENSQ_THREADS", show_envvar=True,
              help="CPU threads for torch and numba together (default: the CPUs this process may use). Lower it "
                   "when other jobs share the cores; progress bars show the count.")
def main(threads) -> None:
    """sensq: which layers of a video diffusion transformer can run in 4 bits.

    \b
    Everything at once, on an embedded model (about 3.5 minutes on 2 CPU cores; see sensq demo --help):
      sensq demo --out sensq-demo
    \b
    The method, step by step:
      sensq prompts SOURCE       filter OpenS2V / VBench prompts into a study's prompt file
      sensq probe                record per-layer, per-expert, per-step activations into HDF5
      sensq rank PROBE.h5        rank each expert's layers by end-to-end sensitivity (grad-e2e; e2e, mse, ...)
      sensq plan RANKING.json    protected entrance set + formats under a budget, as a plan file
      sensq apply-plan PLAN.json quantize (calibrated) and write a packed checkpoint (--model DIR loads it)
      sensq generate --out DIR   matched generations (mp4 + frames + latents + manifest), resumable
      sensq eval DIR --reference FP_DIR   fidelity: latent NMSE, PSNR, SSIM, first-frame, temporal
      sensq ablate RANKING.json  sweep protected sets (budgets, fixed rules, random draws, your plans), paired
      sensq report RANKING.json  heatmaps, top-layer bars, Markdown + self-contained HTML
      sensq export CKPT --to comfyui|gguf   the measured checkpoint as ComfyUI / ComfyUI-GGUF files
      sensq audit FILE --model SRC          is someone's ComfyUI/GGUF file sound, and what does it cost
    \b
    Formats and numerics:
      sensq formats              the 4-bit (and reference) formats, their bits and ranges
      sensq formats --measure    ... plus the SQNR each reaches on seeded test tensors

    Every command has --help with examples. Errors are one line; exit 1 = failure, 2 = usage.
    """
    from sensq.runtime import set_threads

    set_threads(threads)


def _load_plugins() -> None:
    """Extensions register before the commands below read the registries for their choices (sensq.plugins)."""
    from sensq.plugins import load_plugins

    try:
        load_plugins()
    except SensqError as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(1)


_load_plugins()

from sensq.cli.ablate import ablate, demo  # noqa: E402
from sensq.cli.apply_plan import apply_plan  # noqa: E402
from sensq.cli.export import audit, export  # noqa: E402
from sensq.cli.formats import formats  # noqa: E402
from sensq.cli.generate import eval_command, generate  # noqa: E402
from sensq.cli.plan import plan  # noqa: E402
from sensq.cli.probe import probe  # noqa: E402
from sensq.cli.prompts import prompts  # noqa: E402
from sensq.cli.rank import rank  # noqa: E402
from sensq.cli.report import report  # noqa: E402

main.add_command(formats)
main.add_command(prompts)
main.add_command(probe)
main.add_command(rank)
main.add_command(plan)
main.add_command(report)
main.add_command(apply_plan)
main.add_command(generate)
main.add_command(eval_command)
main.add_command(ablate)
main.add_command(demo)
main.add_command(export)
main.add_command(audit)
