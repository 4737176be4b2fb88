"""Typed errors. Every failure fxbt reports derives from `FxbtError` and says what to do next."""


class FxbtError(Exception):
    """Base class of every error fxbt raises."""


class CaptureError(FxbtError):
    """No frontend could turn the model into an FX graph; the message lists each frontend's reason."""

    def __init__(self, reasons: dict[str, str]):
        self.reasons = dict(reasons)
        lines = "\n".join(f"  - {name}: {why}" for name, why in reasons.items())
        super().__init__(
            "fxbt could not capture the model as an FX graph. Each frontend failed:\n"
            f"{lines}\n"
            "Remove data-dependent Python control flow from forward(), or pass frontend=... to pick one."
        )


class PatternError(FxbtError):
    """A pattern or rule is malformed (registration time)."""


class InputError(FxbtError):
    """Inputs given to fxbt (example inputs, or inputs at call time) are not of a usable kind."""


class RewriteError(FxbtError):
    """A rewrite broke an invariant of the graph; the message names the offending node."""
