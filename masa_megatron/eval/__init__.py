"""Evaluation: benchmark files (`benchmarks`), pass@k and meta-awareness metrics (`metrics`),
a resumable per-problem results store, report files and plots (`report`).

Driver loop (the engine part lives elsewhere)::

    store = ResultsStore(out_dir / "results.jsonl")
    done = store.completed_ids()
    for problem in load_benchmark("aime2025").problems:
        if problem.id in done:
            continue
        record = generate_and_grade(problem)      # dict, see `report` for the fields
        store.append(record)
    write_report(store.records(), out_dir / "report")
"""
