"""One error type for bad input, printed by the CLI as a single line."""


class ConfigError(ValueError):
    """Bad user input (a config value, a data file): the message names the file and field."""
