"""Typed errors. Every failure fxbt reports derives from `FxbtError` and says what to do next."""


class FxbtError(Exception):
    """Base class of every error fxbt raises."""


class CaptureError(FxbtError):
    """No frontend could turn the model into an FX graph; the message lists each frontend's reason."""

    def __init__(self, reasons: dict[str, str], training: bool = False, blocker: str | None = None,
                 advice: str | None = None):
        self.reasons = dict(reasons)
        self.training = training
        self.blocker = blocker  # the line of model code capture stopped at, where one was found
        lines = "\n".join(f"  - {name}: {why}" for name, why in reasons.items())
        if advice is None:
            advice = ("The model is in training mode: its dropout draws random numbers, and a graph must reproduce "
                      "them under one seed. For inference, call model.eval() first." if training else
                      f"Capture is blocked at {blocker}. Make that line independent of tensor values (no branch, "
                      ".item() or .tolist() on them), or pass frontend=... to pick one." if blocker else
                      "Make forward() independent of tensor values (no branch on them), or pass frontend=... to pick "
                      "one.")
        super().__init__(f"fxbt could not capture the model as an FX graph. Each frontend failed:\n{lines}\n{advice}")

    def short(self) -> str:
        """One line: each frontend's reason."""
        return "; ".join(f"{name}: {why}" for name, why in self.reasons.items())


class PatternError(FxbtError):
    """A pattern or rule is malformed (registration time)."""


class InputError(FxbtError, ValueError):
    """Inputs given to fxbt (example inputs, or inputs at call time) are not of a usable kind."""


class RewriteError(FxbtError):
    """A rewrite broke an invariant of the graph; the message names the offending node."""


class ExportError(FxbtError):
    """An export cannot be written where asked, or a file is not a valid fxbt export; the message names the
    path and what to do (another path, ``overwrite=True``, or exporting again)."""
