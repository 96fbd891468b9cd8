"""The fleet simulator (`vlctl simulate SPEC`): the real controller (reconciler, policies, store, goodput ledger)
driven through a simulated cluster and an injected clock, from failure to failure, so what is simulated is
vlctl's own decisions. Modules, one concern each:

    failures   the failure model: causes, their rates, how vlctl sees each, stragglers and lemon nodes (YAML)
    costs      the cost model: what detection, teardown, launch, load, checkpoint and recovery take at a size
    analytic   the first-order ETTR model and Young/Daly's interval, for validation
    spec       the simulation's input (job, policy, models, seeds) and the TrainingJob spec it becomes
    world      the simulated cluster and trainer: where the job is at any simulated time
    backend    the Backend/GangHandle/TelemetrySource the reconciler drives, and the recovery coordinator
    driver     one run: store, controller, and the event loop that advances the clock
    report     runs over seeds, confidence intervals, tables and plots
"""
