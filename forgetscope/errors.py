"""The base class of errors caused by user input (recipes, data, model references, flags).

The CLI prints each line of such an error as one ``forgetscope: error:`` line and exits with
code 2; anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad user input; the message names the problem and the fix."""
