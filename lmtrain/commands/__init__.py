"""One module per `lmtrain <command>`: each a thin Hydra app that composes a config and calls the library."""
