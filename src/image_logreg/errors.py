"""Errors a user can cause. The CLI turns each into one line on stderr and exit status 2."""


class ImageLogregError(Exception):
    """Base class for bad input: the message is shown to the user as is."""


class DataError(ImageLogregError):
    """A dataset is missing, corrupt or truncated."""


class ImageError(ImageLogregError):
    """An image file cannot be read or holds no usable image."""


class ImageTooLargeError(ImageError):
    """An image with more pixels than is safe to decode (a decompression bomb, or a mistake)."""


class CheckpointError(ImageLogregError):
    """A checkpoint is unreadable or does not fit the model or dataset."""


class DivergedError(ImageLogregError):
    """Training produced a non-finite loss."""


class UsageError(ImageLogregError):
    """A flag value or combination of flags makes no sense."""
