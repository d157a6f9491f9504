"""Ray Tune sweeps over λ and the learning rate (the job behind jobs/tune_lambda.py).

    config.py     SweepConfig: target (digits | qwen), search specs, tune / asha settings, presets
    search.py     KIND:ARGS specs (grid / choice / uniform / loguniform / randint) -> Tune domains
    resources.py  per-trial needs and max_concurrent_trials = min_r floor(capacity_r / need_r)
    probes.py     the digits 1-NFE quality probe (DigitsJudge) reported at ASHA's rungs
    trials.py     the Tune function trainable: trial values -> target config -> TorchTrainer.fit()
                  with TuneReportCallback
    sweep.py      the driver: Tuner (ASHA) or Tuner.restore of an interrupted sweep -> results
    results.py    trials.md / trials.csv, metric_vs_lambda.png, best_train_qwen.yaml, best_study.yaml

Import the submodules directly; this package imports nothing heavy.
"""
