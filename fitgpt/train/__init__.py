"""Training: one step built once, the loop around it, and what keeps a run alive.

Owns: `build_training` (build: runtime, model, optimizer, scaler, batches and the step; the one
factory that `fitgpt train`, `plan --verify` and `fitgpt bench` all run), the step itself and
the learning-rate schedule (step), the AdamW step fused into backward (fused), the `Trainer`
and its phases: set-up, step, evaluate, checkpoint, finish (trainer), the checkpointable
`TrainState`: the checkpoint is its state_dict and nothing else spells its keys (state);
several processes (distributed: World, DDP, FSDP2), compile (parallelize), numerical guards
(guard), random state (rng), the out-of-memory back-off (recover), per-phase peak memory
(measure), fault injection for the tests (faults), and `fitgpt bench` (bench).

May import: report, eval, store, planner, model, data, config and the base modules. Imports
torch.

Entry points: `trainer.run(cfg)` (a `Trainer`'s run), `build.build_training(cfg, world)`,
`state.TrainState`, `distributed.launch`, `bench.cli`.
"""
