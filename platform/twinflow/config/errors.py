"""The one error type config problems raise: one line naming the field and the fix."""


class ConfigError(ValueError):
    """A bad configuration value, reported before any cluster work starts."""


def require(cond: bool, path: str, message: str) -> None:
    """Raise ``ConfigError("<path>: <message>")`` unless ``cond`` holds."""
    if not cond:
        raise ConfigError(f"{path}: {message}" if path else message)
