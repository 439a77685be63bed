"""Learning: classifiers, calibration, metrics, the patient rule, the one fold runner,
validation, the experiment grid and the fit that `run` saves. No Prefect, no Ray.
"""
