"""The report's two exceptions: bad input (ReportError, whose message says what was expected) and a run or
metric that cannot be used (ReportWarning)."""


class ReportError(RuntimeError):
    """Bad input (unknown study, missing runs, bad report block): the message says what was expected."""


class ReportWarning(UserWarning):
    """A run that could not be used (corrupt folder) or a metric that is missing."""
