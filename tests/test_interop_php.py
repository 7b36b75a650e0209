"""Interop: PHP's gearman extension (pecl gearman on libgearman 1.1.20) as client and worker."""
import json

import pytest

from conftest import need_tool
from clients import (HANDLE_PREFIX, finish, log_lines, procs, run, run_client_script,  # noqa: F401
                     status_unique, wait_until)

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


@pytest.fixture
def php(server, tmp_path, procs):
    """php.client(code, *args) runs a client script and returns its JSON output;
    php.worker(count) starts the worker script (log in php.log, release file php.release)."""
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
    poll = r"""
$deadline = microtime(true) + 10;
do {
    $s = $c->jobStatus($argv[2]);
    if (json_encode($s) === $argv[3]) break;
    usleep(10000);
} while (microtime(true) < $deadline);
echo json_encode($s);
"""
    assert php.client(poll, handle, "[true,true,3,7]") == [True, True, 3, 7]
    assert server.status()["slowstatus"] == (1, 1, 1)
    php.release.touch()
    assert php.client(poll, handle, "[false,false,0,0]") == [False, False, 0, 0]


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
