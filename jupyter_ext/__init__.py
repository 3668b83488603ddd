"""IPython extension for Shoal (magics come with the notebook release)."""


def load_ipython_extension(ipython):  # noqa: ARG001
    pass
