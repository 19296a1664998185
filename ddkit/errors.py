"""The one exception type for bad input: its message is a single line naming the field and the value."""


class DDKitError(Exception):
    """Bad input (a config value, a file, a tensor). The CLI prints the message alone and exits non-zero."""


def check(condition: bool, field: str, message: str, value: object) -> None:
    """Raise ``DDKitError("<field>: <message>, got <value>")`` unless ``condition`` holds."""
    if not condition:
        raise DDKitError(f"{field}: {message}, got {value!r}")
