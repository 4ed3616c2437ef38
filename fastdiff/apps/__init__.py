"""Applications built on the text-to-image core: each module is one ``fastdiff`` sub-command.

Every application runs through the same samplers (`fastdiff.samplers`) and fused ops;
a module here holds its Python API plus ``HELP``, ``add_arguments(parser)`` and
``run(args)`` for the command line (registered in `fastdiff.cli.APPS`).
"""
