# The configuration from the seed note (../shared/seed), nanoGPT-style, as its author wrote it:
# a 12-layer, 576-wide GPT (77M parameters) on FineWeb on a 12 GB RTX 4070.
batch_size = 16
gradient_accumulation_steps = 32   # keeps effective 512 seqs
block_size = 1024

eval_batch_size = 4        # critical
eval_iters = 100
eval_interval = 500

n_layer = 12
n_head = 12
n_embd = 576
dtype = 'float16'
dataset = 'fineweb'
