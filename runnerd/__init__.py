"""runnerd: a runner core that executes customer steps, each in a fresh confined process."""

__version__ = "0.1.0"
