"""User-facing errors: the CLI and server print their message, never a traceback."""


class HanlinError(Exception):
    """Base class for mistakes a user can fix (bad path, unsupported model, bad template...)."""


class CheckpointError(HanlinError):
    """A checkpoint file or directory is missing, truncated, mismatched or in a refused format."""


class UnsupportedModelError(HanlinError):
    """The checkpoint describes an architecture or tokenizer Hanlin does not implement."""


class ChatTemplateError(HanlinError):
    """A chat template is missing or failed to render."""
