from runnerd.cli import entry

entry()
