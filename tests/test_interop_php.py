"""Interop: PHP's gearman extension (pecl gearman on libgearman 1.1.20) as client and worker."""
import json
import re

import pytest

from conftest import need_tool
from clients import (HANDLE_PREFIX, finish, log_lines, procs, run, run_client_script,  # noqa: F401
                     status_unique, wait_status, wait_until)

WORKER_PHP = r"""<?php
// php worker.php PORT COUNT LOGFILE RELEASEFILE
[$_, $port, $count, $logfile, $release] = $argv;
$w = new GearmanWorker();
$w->addServer("127.0.0.1", (int)$port);
$w->addFunction("reverse", function ($job) { return strrev($job->workload()); });
$w->addFunction("log", function ($job) use ($logfile) {
    file_put_contents($logfile, $job->workload() . "\n", FILE_APPEND);
    return "ok:" . $job->workload();
});
$w->addFunction("whoami", function ($job) {
    return json_encode([$job->handle(), $job->functionName(), $job->unique(), $job->workload()]);
});
$w->addFunction("chatty", function ($job) {
    $job->sendData("d1");
    $job->sendStatus(1, 3);
    $job->sendWarning("w1");
    $job->sendData("d2");
    $job->sendStatus(2, 3);
    return "done:" . $job->workload();
});
$w->addFunction("explode", function ($job) {
    $job->sendData("partial");
    $job->sendException("boom");
    return null;
});
$w->addFunction("failing", function ($job) {
    $job->sendFail();
    return null;
});
$w->addFunction("slowstatus", function ($job) use ($release) {
    $job->sendStatus(3, 7);
    $deadline = microtime(true) + 20;
    while (!file_exists($release) && microtime(true) < $deadline) { usleep(5000); }
    return "released";
});
for ($i = 0; $i < (int)$count; $i++) {
    if (!$w->work()) { fwrite(STDERR, "work() failed: " . $w->error() . "\n"); exit(1); }
}
"""

CLIENT_HEAD = r"""<?php
$port = (int)$argv[1];
$c = new GearmanClient();
$c->addServer("127.0.0.1", $port);
$c->setTimeout(15000);
"""

WORKER_HEAD = r"""<?php
$port = (int)$argv[1];
$w = new GearmanWorker();
$w->addServer("127.0.0.1", $port);
"""

POLL_STATUS = r"""
// poll $c->METHOD(KEY) until its JSON is EXPECTED (or 10 s pass); print the last answer
[$method, $key, $expected] = array_slice($argv, 2);
$deadline = microtime(true) + 10;
do {
    $s = $c->$method($key);
    if (json_encode($s) === $expected) break;
    usleep(10000);
} while (microtime(true) < $deadline);
echo json_encode($s);
"""


@pytest.fixture
def server(make_server, request):
    """The job server; a test may give it gearmand options by indirect parametrization."""
    return make_server(*getattr(request, "param", ()))


@pytest.fixture
def php(server, tmp_path, procs):
    """php.client(code, *args) runs a client script and returns its JSON output;
    php.worker(count) starts the worker script (log in php.log, release file php.release);
    php.start_worker(code, *args) starts WORKER_HEAD + code."""
    exe = need_tool("php")
    probe = run([exe, "-r", 'echo class_exists("GearmanClient") ? "yes" : "no";'], check_rc=False)
    if probe.stdout != b"yes":
        from conftest import unavailable
        unavailable("PHP gearman extension is not loaded")

    class Php:
        log = tmp_path / "php-worker.log"
        release = tmp_path / "php-release"
        counter = 0

        def script(self, code):
            Php.counter += 1
            path = tmp_path / f"script{Php.counter}.php"
            path.write_text(code)
            return path

        def client(self, code, *args, background=False):
            return run_client_script(procs, [exe, "-d", "display_errors=stderr",
                                             self.script(CLIENT_HEAD + code), server.port, *args],
                                     background)

        def worker(self, count):
            path = tmp_path / "worker.php"
            if not path.exists():
                path.write_text(WORKER_PHP)
            return procs.start([exe, "-d", "display_errors=stderr", path, server.port, count,
                                self.log, self.release])

        def start_worker(self, code, *args):
            return procs.start([exe, "-d", "display_errors=stderr",
                                self.script(WORKER_HEAD + code), server.port, *args])

        def log_lines(self):
            return log_lines(self.log)

    return Php()


def workers_of(server, func):
    return server.status().get(func, (0, 0, 0))[2]


PHP_FUNCTIONS = ("reverse", "log", "whoami", "chatty", "explode", "failing", "slowstatus")


def start_idle_worker(php, server, count):
    proc = php.worker(count)
    wait_until(lambda: all(workers_of(server, f) == 1 for f in PHP_FUNCTIONS), 10,
               "php worker registered")
    return proc


def test_php_do_normal_high_low_return_worker_results(server, php):
    start_idle_worker(php, server, 4)
    out = php.client(r"""
$r = [];
$r[] = [$c->doNormal("reverse", "abc"), $c->returnCode()];
$r[] = [$c->doHigh("reverse", "hello"), $c->returnCode()];
$r[] = [$c->doLow("reverse", "xyz"), $c->returnCode()];
$r[] = [bin2hex($c->doNormal("reverse", "a\0b\xff\0")), $c->returnCode()];
echo json_encode($r);
""")
    assert out == [["cba", 0], ["olleh", 0], ["zyx", 0], ["00ff620061", 0]]


def test_php_worker_sees_handle_function_and_unique(server, php):
    start_idle_worker(php, server, 1)
    out = php.client(r"""
echo json_encode([$c->doNormal("whoami", "payload", "my-unique-1"), $c->returnCode()]);
""")
    result, code = out
    assert code == 0
    assert json.loads(result) == [f"{HANDLE_PREFIX}:1", "whoami", "my-unique-1", "payload"]


def test_php_do_normal_reports_work_fail(server, php):
    start_idle_worker(php, server, 1)
    out = php.client(r"""
$res = $c->doNormal("failing", "x");
echo json_encode([$res, $c->returnCode()]);
""")
    assert out == ["", 24]     # GEARMAN_WORK_FAIL


def test_php_background_job_runs_on_later_worker(server, php):
    out = php.client(r"""
$h = $c->doBackground("log", "bg-payload");
echo json_encode([$h, $c->returnCode(), $c->jobStatus($h)]);
""")
    handle = f"{HANDLE_PREFIX}:1"
    assert out == [handle, 0, [True, False, 0, 0]]
    assert server.status()["log"] == (1, 0, 0)
    assert finish(php.worker(1))[0] == 0
    assert php.log_lines() == ["bg-payload"]
    assert server.status()["log"] == (0, 0, 0)
    status = php.client(r"""echo json_encode($c->jobStatus($argv[2]));""", handle)
    assert status == [False, False, 0, 0]


def test_php_background_priorities_run_high_normal_low(server, php):
    out = php.client(r"""
$h = [];
$h[] = $c->doLowBackground("log", "low");
$h[] = $c->doBackground("log", "normal");
$h[] = $c->doHighBackground("log", "high");
$h[] = $c->doLowBackground("log", "low2");
echo json_encode([$h, $c->returnCode()]);
""")
    assert out == [[f"{HANDLE_PREFIX}:{i}" for i in range(1, 5)], 0]
    assert server.admin("prioritystatus") == b"log\t1\t1\t2\t0\n.\n"
    assert finish(php.worker(4))[0] == 0
    assert php.log_lines() == ["high", "normal", "low", "low2"]


def test_php_job_status_reports_running_job_progress(server, php):
    handle = php.client(r"""echo json_encode($c->doBackground("slowstatus", "x"));""")
    php.worker(1)
    assert php.client(POLL_STATUS, "jobStatus", handle, "[true,true,3,7]") == [True, True, 3, 7]
    assert server.status()["slowstatus"] == (1, 1, 1)
    php.release.touch()
    gone = php.client(POLL_STATUS, "jobStatus", handle, "[false,false,0,0]")
    assert gone == [False, False, 0, 0]


def test_php_job_status_by_unique_key_follows_a_background_job(server, php):
    out = php.client(r"""
$h = $c->doBackground("slowstatus", "x", "php-uniq-1");
echo json_encode([$h, $c->jobStatusByUniqueKey("php-uniq-1"),
                  $c->jobStatusByUniqueKey("no-such-unique")]);
""")
    assert out == [f"{HANDLE_PREFIX}:1", [True, False, 0, 0], [False, False, 0, 0]]
    php.worker(1)
    running = php.client(POLL_STATUS, "jobStatusByUniqueKey", "php-uniq-1", "[true,true,3,7]")
    assert running == [True, True, 3, 7]
    php.release.touch()
    gone = php.client(POLL_STATUS, "jobStatusByUniqueKey", "php-uniq-1", "[false,false,0,0]")
    assert gone == [False, False, 0, 0]
    assert server.status()["slowstatus"] == (0, 0, 0)


def test_php_client_and_worker_ping_echo_their_payload(server, php):
    out = php.client(r"""
$w = new GearmanWorker();
$w->addServer("127.0.0.1", $port);
echo json_encode([$c->ping("hello"), $c->ping(str_repeat("\0\xffping", 20000)),
                  $w->ping("from a worker"), $c->returnCode(), $w->returnCode()]);
""")
    assert out == [True, True, True, 0, 0]   # libgearman checks the echo is the payload


def test_php_worker_set_id_is_listed_by_admin_workers(server, php):
    php.start_worker(r"""
$w->setId("php-worker-7");
$w->addFunction("alpha", function ($job) { return "a"; });
$w->addFunction("beta", function ($job) { return "b"; }, null, 5);
$w->addFunction("gamma", function ($job) { return "g"; });
$w->work();
""")
    line = re.compile(rb"\d+ 127\.0\.0\.1 php-worker-7 : alpha beta gamma")
    wait_until(lambda: any(line.fullmatch(row) for row in server.admin("workers").split(b"\n")),
               10, "the worker listed with its id and functions")


OVERRUN_WORKER = r"""
// args: PORT WORKS LOGFILE RELEASEFILE; the first run outlasts the 1 s timeout
[$works, $logfile, $release] = array_slice($argv, 2);
$runs = 0;
$w->addFunction("overrun", function ($job) use (&$runs, $logfile, $release) {
    file_put_contents($logfile, $job->handle() . "\n", FILE_APPEND);
    $runs++;
    $deadline = microtime(true) + 20;
    while ($runs == 1 && !file_exists($release) && microtime(true) < $deadline) { usleep(5000); }
    return "run:$runs";
}, null, 1);
$works_done = [];
for ($i = 0; $i < (int)$works; $i++) { $works_done[] = [@$w->work(), $w->returnCode()]; }
echo json_encode($works_done);
"""


def start_overrun(php, server, works):
    """Start OVERRUN_WORKER and a doNormal("overrun") client; return (worker, client) once
    the worker holds the job in its first, blocked run."""
    worker = php.start_worker(OVERRUN_WORKER, works, php.log, php.release)
    wait_until(lambda: workers_of(server, "overrun") == 1, 10, "overrun worker registered")
    client = php.client(r"""
echo json_encode([$c->doNormal("overrun", "x"), $c->returnCode()]);
""", background=True)
    wait_until(lambda: php.log_lines() == [f"{HANDLE_PREFIX}:1"], 10, "the first run started")
    return worker, client


def test_php_worker_timeout_requeues_the_job_and_the_client_gets_the_rerun(server, php):
    # libgearman sends addFunction's timeout as is; gearmand reads milliseconds and
    # waits at least 1 s before it takes the job back
    worker, client = start_overrun(php, server, 3)
    wait_status(server, "overrun", (1, 0, 1))     # queued again while the first run goes on
    php.release.touch()
    rc, out, err = finish(client)
    assert (rc, err) == (0, b"")
    assert json.loads(out) == ["run:2", 0]
    # the late WORK_COMPLETE is refused with ERROR; the next work() reads it and fails
    rc, out, err = finish(worker)
    assert (rc, err) == (0, b"")
    assert json.loads(out) == [[True, 0], [False, 11], [True, 0]]   # GEARMAN_UNEXPECTED_PACKET
    assert php.log_lines() == [f"{HANDLE_PREFIX}:1"] * 2
    wait_status(server, "overrun", (0, 0, 0))


@pytest.mark.parametrize("server", [("-j", "1")], indirect=True, ids=["job-retries-1"])
def test_php_worker_timeout_with_job_retries_fails_the_client(server, php):
    worker, client = start_overrun(php, server, 2)
    rc, out, err = finish(client)
    assert (rc, err) == (0, b"")
    assert json.loads(out) == ["", 24]            # GEARMAN_WORK_FAIL, before the run ends
    wait_status(server, "overrun", (0, 0, 1))    # dropped, the worker still running it
    php.release.touch()
    rc, out, err = finish(worker)
    assert (rc, err) == (0, b"")
    assert json.loads(out) == [[True, 0], [False, 11]]
    assert php.log_lines() == [f"{HANDLE_PREFIX}:1"]


CALLBACKS = r"""
$log = [];
$key = function ($t) { return $t->functionName() . "/" . $t->unique(); };
$c->setCreatedCallback(function ($t) use (&$log, $key) { $log[$key($t)][] = "created:" . $t->jobHandle(); });
$c->setDataCallback(function ($t) use (&$log, $key) { $log[$key($t)][] = "data:" . $t->data(); });
$c->setStatusCallback(function ($t) use (&$log, $key) {
    $log[$key($t)][] = "status:" . $t->taskNumerator() . "/" . $t->taskDenominator(); });
$c->setWarningCallback(function ($t) use (&$log, $key) { $log[$key($t)][] = "warning:" . $t->data(); });
$c->setExceptionCallback(function ($t) use (&$log, $key) { $log[$key($t)][] = "exception:" . $t->data(); });
$c->setFailCallback(function ($t) use (&$log, $key) { $log[$key($t)][] = "fail"; });
$c->setCompleteCallback(function ($t) use (&$log, $key) { $log[$key($t)][] = "complete:" . $t->data(); });
"""


def test_php_run_tasks_delivers_data_status_warning_and_complete_callbacks(server, php):
    start_idle_worker(php, server, 2)
    out = php.client(CALLBACKS + r"""
$c->addTask("chatty", "p1", null, "u1");
$c->addTaskHigh("reverse", "stressed", null, "u2");
$ok = $c->runTasks();
echo json_encode([$ok, $log]);
""")
    ok, log = out
    assert ok is True
    h_chatty = log["chatty/u1"][0].split(":", 1)[1]
    h_reverse = log["reverse/u2"][0].split(":", 1)[1]
    assert {h_chatty, h_reverse} == {f"{HANDLE_PREFIX}:1", f"{HANDLE_PREFIX}:2"}
    assert log["chatty/u1"][1:] == ["data:d1", "status:1/3", "warning:w1", "data:d2", "status:2/3",
                                    "complete:done:p1"]
    assert log["reverse/u2"][1:] == ["complete:desserts"]


def test_php_run_tasks_delivers_exception_and_fail_callbacks(server, php):
    worker = start_idle_worker(php, server, 2)
    out = php.client(CALLBACKS + r"""
$c->addTask("explode", "e", null, "ue");
$c->addTask("failing", "f", null, "uf");
$ok = $c->runTasks();
echo json_encode([$ok, $log]);
""")
    ok, log = out
    assert ok is True
    assert log["explode/ue"][1:] == ["data:partial", "exception:boom"]
    assert log["failing/uf"][1:] == ["fail"]
    assert finish(worker)[0] == 0          # the worker handled exactly these two jobs
    status = server.status()
    assert (status["explode"], status["failing"]) == ((0, 0, 0), (0, 0, 0))


def test_php_add_task_background_returns_handles_and_runs_later(server, php):
    out = php.client(CALLBACKS + r"""
$c->addTaskBackground("log", "t1", null, "bg1");
$c->addTaskLowBackground("log", "t3", null, "bg3");
$c->addTaskHighBackground("log", "t2", null, "bg2");
$ok = $c->runTasks();
echo json_encode([$ok, $log]);
""")
    ok, log = out
    assert ok is True
    assert sorted(log) == ["log/bg1", "log/bg2", "log/bg3"]
    assert sorted(events for task in log.values() for events in task) == [
        f"created:{HANDLE_PREFIX}:{i}" for i in (1, 2, 3)]
    assert server.status()["log"] == (3, 0, 0)
    assert server.admin("prioritystatus") == b"log\t1\t1\t1\t0\n.\n"
    assert finish(php.worker(3))[0] == 0
    assert php.log_lines() == ["t2", "t1", "t3"]


def test_php_tasks_with_same_unique_share_one_execution(server, php):
    client = php.client(CALLBACKS + r"""
$c->addTask("log", "payload-a", null, "same-uniq");
$c->addTask("log", "payload-b", null, "same-uniq");
$ok = $c->runTasks();
echo json_encode([$ok, $log]);
""", background=True)
    wait_until(lambda: server.status().get("log") == (1, 0, 0)
               and status_unique(server, "same-uniq")[4] == 2, 10, "two clients on one job")
    worker = php.worker(1)
    rc, out, err = finish(client)
    assert rc == 0 and err == b"", err
    ok, log = json.loads(out)
    assert ok is True
    assert finish(worker)[0] == 0
    # the job runs once, with the payload of whichever task libgearman submitted first
    ran = php.log_lines()
    assert ran in (["payload-a"], ["payload-b"])
    handle = f"{HANDLE_PREFIX}:1"
    assert log == {"log/same-uniq": [f"created:{handle}", f"created:{handle}",
                                     f"complete:ok:{ran[0]}", f"complete:ok:{ran[0]}"]}
