"""The errors quantkit raises for people: one line naming the thing and what to do.

`InputError` (exit code 2) is for mistakes the user can fix: a bad recipe, a missing shard, a model
spec that does not import. `QuantkitError` (exit code 1) is for a run that failed on valid input.
The CLI prints `ClassName: message` and exits with the code; it never shows a traceback for these.
"""


class QuantkitError(Exception):
    exit_code = 1


class InputError(QuantkitError):
    exit_code = 2


class RecipeError(InputError):
    pass


class PlanError(InputError):
    pass


class ModelSpecError(InputError):
    pass


class CalibrationError(InputError):
    pass


class ModelRaised(CalibrationError):
    """The model raised on one of its inputs (a calibration or evaluation batch): the message names
    the batch and its tensors; `ptq` puts the model spec in front."""


class ExportError(InputError):
    """The model could not be exported (bad input to the exporter, or a graph TensorRT cannot take)."""


class TensorRTUnavailable(InputError):
    pass


def require_positive(flag: str, value: int | None) -> None:
    """A count the user gives (--max-samples, --batch-size) is None (the default) or >= 1: 0 is refused,
    never read as "all" or "the default"."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InputError(f"{flag} {value}: must be a whole number >= 1 (leave it out for the default)")
