"""What lives on disk between runs: checkpoints, run folders, and opening and resuming them.

Owns: atomic checkpoints that cannot run code when loaded (checkpoint), every entry of a loaded
checkpoint checked before anything is built from it (ckptcheck), which checkpoint a path means
(locate), nanoGPT's ckpt.pt read as fitgpt's (nanogpt), a saved run's config and model opened
for use without training (load), run folders and their lock (rundir), and `--resume` /
nanoGPT's init_from='resume' (resume).

May import: planner, model, data, config and the base modules. Imports torch (checkpoints are
torch files, loaded with weights_only).

Entry points: `checkpoint.save_checkpoint`, `checkpoint.load_checkpoint`, `locate.locate`,
`load.load_model`, `rundir.open_run_dir`, `resume.resume_config`.
"""
