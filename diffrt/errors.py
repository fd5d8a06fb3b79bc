"""User-facing errors.

A `DiffrtError` is a mistake the user can fix (a bad argument, a missing or
corrupted file, an unsupported checkpoint). Its message is one line that says what
was wrong and what to do; the CLI prints it without a traceback. Anything else that
escapes is a bug and keeps its traceback.
"""


class DiffrtError(ValueError):
    """A one-line, actionable error about the user's input or files."""


class ArtifactError(DiffrtError):
    """An artifact folder that is missing files, corrupted, or from a newer diffrt."""


class OutOfMemoryError(DiffrtError):
    """A backend could not allocate what a request needed (ONNX Runtime's arena, OpenVINO,
    numpy): the request is too large for the memory this process has."""
