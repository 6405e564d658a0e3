"""The fine-tuning launchers (finetune_flux_dreambooth*_deepspeed_bf16.sh) in Python.

    python -m fluxkit.launch --launcher lora PROG [--key=value ...] [--dry_run] [--demo] [-- TRAINER_ARGS ...]

The two .sh files exec this with their identity (`full` or `lora`); each launcher's defaults are
data (spec.LAUNCHERS). A run goes: read keys (command line over --config FILE over the demo's
values over the defaults), build the trainer's argument list, validate it with the trainer's own
parser and checks (model folder, data, output folder), pick devices and processes, then run
`accelerate launch` with its output passed through a console filter into OUTPUT/logs/, and end
with the trainer's summary (CASE_NAME.log) or one line with the trainer's exit status.
Every user mistake is one `PROG: error: ...` line, exit status 2, before anything is written.

The parts:

    spec      the launchers as data (keys, defaults, demo values, Ascend settings)
    keys      --key=value, --config files, the environment -> a Request; --help
    checks    every check before anything is written
    command   processes, environment, the accelerate command and the trainer's arguments (LaunchPlan)
    console   the run's output through a filter to the terminal and whole into the log; signals
    demo      --demo: the tiny model and data, and images at the end
    record    OUTPUT/run_config.json (also written by a trainer started without a launcher)
    report    the closing report from the trainer's summary (CASE_NAME.log)
    __main__  `run`: the steps in order
"""


def main(argv=None) -> int:
    """The launcher's entry (what `python -m fluxkit.launch` runs): its exit status."""
    from .__main__ import main as launch

    return launch(argv)
