"""Exceptions shared across sdt."""


class UserError(Exception):
    """A problem the user can fix (bad config value, missing file, ...).

    Entry points print only the message of a UserError, without a traceback, so the message must say what is wrong
    and how to fix it, naming the config key or file involved.
    """
