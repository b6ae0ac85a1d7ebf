"""Progress display: plain lines where the output is not a terminal, no IProgress warning in a
notebook without ipywidgets, nothing when disabled."""

import warnings

from tqdm import std

from mcm_prob import progress


def test_plain_lines_when_the_output_is_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 0.0)  # a line per update
    with progress.progress_bar(3, "work") as bar:
        bar.update(1)
        bar.set_postfix_str("half")
        bar.total += 1
        bar.update(3)
    progress.status("stage two")
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "work: 0/3 (0 s)",
        "work: 1/3 (0 s)",
        "work: 1/3 (0 s) half",  # a new stage is written at once
        "work: 4/4 (0 s) half",  # no closing line: this one said it all
        "stage two",
    ]
    assert "\r" not in err and "\x1b" not in err


def test_lines_are_rate_limited(capsys):
    with progress.progress_bar(1000, "many") as bar:
        for i in range(1000):
            bar.update(1)
            bar.set_postfix(loss=i)  # running values wait for the next line
    want = ["many: 0/1000 (0 s)", "many: 1000/1000 (0 s) loss=999"]
    assert capsys.readouterr().err.splitlines() == want


def test_notebook_without_widgets_gets_a_text_bar_and_no_warning(capsys, monkeypatch):
    monkeypatch.setattr(progress, "_in_notebook", lambda: True)
    monkeypatch.setattr(progress, "_widgets", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tqdm.auto warns "IProgress not found" here
        with progress.progress_bar(2, "nb") as bar:
            assert type(bar) is std.tqdm
            bar.update(2)
    assert "nb: 100%" in capsys.readouterr().err


def test_disabled_prints_nothing(capsys):
    with progress.progress_bar(5, "quiet", enabled=False) as bar:
        bar.update(5)
        bar.set_postfix_str("x")
    progress.status("hidden", enabled=False)
    assert capsys.readouterr().err == ""
