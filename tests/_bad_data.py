"""A check shared by the integrations' tests: a monitor that met a batch holding NaN reports bad data, not
divergence."""

from __future__ import annotations


def assert_named_as_bad_data(monitor, caught, step: int, named: str) -> None:
    """``monitor``'s history row of ``step`` (only it) names ``named``, a warning among ``caught`` does and advises
    fixing the data (the framework steps on it), and the summary blames the data, not divergence."""
    history = monitor.history
    assert history.loc[history["nonfinite_data"].notna(), "step"].tolist() == [step]
    assert history["nonfinite_data"][step] == named
    assert [str(warning.message) for warning in caught
            if str(warning.message).startswith(f"step {step}: the batch holds {named}: check the data")
            and "the framework takes the optimizer step on it all the same" in str(warning.message)]
    summary = monitor.summary()
    assert summary.divergence is None and summary.bad_data == f"the batch of step {step} holds {named}"
    assert "diverged" not in str(summary)
