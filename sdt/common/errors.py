"""Exceptions shared across sdt, and the exit status of a command that stops on one."""

EXIT_USER_ERROR = 2  # what every command exits with on a UserError (argparse uses 2 for usage errors too)


class UserError(Exception):
    """A problem the user can fix (bad config value, missing file, ...).

    Entry points print only the message of a UserError, without a traceback, so the message must say what is wrong
    and how to fix it, naming the config key or file involved.
    """
