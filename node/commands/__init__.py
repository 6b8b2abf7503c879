"""One module per ``lobevol`` subcommand.

Each module defines ``register(subparsers)``, which adds its parser and sets
``func`` (a callable taking the parsed ``argparse.Namespace`` and returning an
exit status). ``node.cli`` discovers every module here (no list to edit;
``node.cli.COMMAND_ORDER`` only sets the order of ``--help``). Heavy imports belong inside the handler, so ``--help`` stays fast.
"""
