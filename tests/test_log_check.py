"""The check every make_server runs at teardown (conftest.Server.log_problems):
a traceback or an "internal error" in any of a server's logs is found, in its
stderr and in a -l file of its own; the errors a server logs on purpose are not."""
from conftest import Server

EXPECTED = ("  ERROR 2026-01-01 00:00:00 persistent queue write failed: SQLite q.db: no such"
            " table: gearman_queue\n"
            "WARNING 2026-01-01 00:00:00 127.0.0.1: not reading its replies (9 bytes waiting),"
            " closing\n")


def test_expected_errors_are_not_problems(tmp_path):
    server = Server(tmp_path, ["-l", "own.log"])
    server.log_path.write_text(EXPECTED)
    (tmp_path / "own.log").write_text(EXPECTED)
    assert server.log_problems() == []


def test_a_traceback_on_stderr_is_found(tmp_path):
    server = Server(tmp_path, [])
    server.log_path.write_text(EXPECTED + "Exception in thread store-writer:\n"
                               "Traceback (most recent call last):\n  File \"gearmand.py\"\n"
                               "RuntimeError: boom\n")
    problems = server.log_problems()
    assert len(problems) == 1 and "RuntimeError: boom" in problems[0]


def test_an_internal_error_in_the_log_file_is_found(tmp_path):
    for args in (["-l", "own.log"], ["--log-file=own.log"], ["--log-file", str(tmp_path / "own.log")]):
        server = Server(tmp_path, args)
        server.log_path.write_text(EXPECTED)
        (tmp_path / "own.log").write_text(
            EXPECTED + "  ERROR 2026-01-01 00:00:00 127.0.0.1: closing after an internal error:\n"
            "Traceback (most recent call last):\nKeyError: 1\n")
        problems = server.log_problems()
        assert problems and "own.log" in problems[0] and "KeyError: 1" in problems[0], args
