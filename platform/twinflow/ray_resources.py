"""Custom Ray resources that tie each kind of work to its node type (cluster/*.yaml).

Node types advertise one unit per GPU (training, eval) or per CPU (data decoding) of:
  twinflow_train   8×H100/H200 training nodes   -> Ray Train workers (jobs/train_qwen.py, Tune trials)
  twinflow_eval    eval GPU nodes               -> generation and scorer actors (evals/)
  twinflow_data    CPU nodes for Ray Data       -> decode/resize tasks (jobs/precache.py)
Job configs name them in ``resources`` fields; CPU presets leave them out so a laptop runs as is.
"""

TRAIN = "twinflow_train"
EVAL = "twinflow_eval"
DATA = "twinflow_data"
