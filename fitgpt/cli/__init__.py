"""The `fitgpt` command: one module per subcommand, argument handling and nothing more.

Owns: reading each subcommand's arguments (train, plan, eval, sample, prepare, data, runs,
plot, export; `bench` parses its own, in fitgpt.train.bench) and handing them to the layer that
does the work, exit codes and one-line errors (main), and the CUDA allocator setting made
before anything imports torch.

May import: every layer below it (it is the top one). Never torch at module level: main looks a
subcommand's module up by name and imports it only to run it, and each of those imports the
layers it calls inside its function, so that `fitgpt plan` and `fitgpt --help` start without
torch (tests/test_layers.py).

Entry points: `main.entry` (the `fitgpt` script, `python -m fitgpt`), `main.main(argv)`, and
`cmd_<name>(args)` in each subcommand's module.
"""
