"""The command line: one module per `prunetune COMMAND`, each only argparse (generated from the command's config
dataclass by `flags`) and one call into the library. No library module imports from here."""
