"""Interop: Perl Gearman::Client / Gearman::Worker (libgearman-client-perl 2.004)."""
import json

import pytest

from conftest import IMPL, need_tool, unavailable
from clients import (HANDLE_PREFIX, finish, log_lines, procs, run, run_client_script,  # noqa: F401
                     status_unique, wait_status, wait_until)

WORKER_PL = r"""
use strict; use warnings;
use Gearman::Worker;
$| = 1;
my ($port, $count, $logfile, $release) = @ARGV;
my $w = Gearman::Worker->new(job_servers => ["127.0.0.1:$port"]);
my $done = 0;
sub logit { open(my $fh, ">>", $logfile) or die; print $fh $_[0], "\n"; close $fh; }
sub await_release {
    my $end = time + 20;
    select(undef, undef, undef, 0.005) until -e $release || time > $end;
}
$w->register_function(reverse => sub { $done++; return scalar reverse ${ $_[0]->argref }; });
$w->register_function(log => sub { $done++; logit(${ $_[0]->argref }); return "ok:" . ${ $_[0]->argref }; });
$w->register_function(progress => sub {
    my $job = shift; $done++;
    $job->set_status(1, 4);
    $job->set_status(3, 4);
    return "progressed";
});
$w->register_function(dies => sub { $done++; die "worker died\n"; });
$w->register_function(fails => sub { $done++; return undef; });
$w->register_function(hold => sub {
    my $job = shift; $done++;
    $job->set_status(2, 5);
    await_release();
    return "held";
});
$w->register_function(overrun => 1, sub {    # CAN_DO_TIMEOUT: 1 ms, which gearmand makes 1 s
    my $job = shift; $done++;
    logit(${ $job->argref });
    await_release();
    return "overran";
});
$w->work(stop_if => sub { $done >= $count });
"""

PERL_FUNCTIONS = ("reverse", "log", "progress", "dies", "fails", "hold", "overrun")

CLIENT_HEAD = r"""
use strict; use warnings;
use Gearman::Client; use JSON::PP; use Storable;
my $port = shift @ARGV;
my $c = Gearman::Client->new(job_servers => ["127.0.0.1:$port"], exceptions => 1);
my $json = JSON::PP->new->canonical;
"""


@pytest.fixture
def perl(server, tmp_path, procs):
    exe = need_tool("perl")
    probe = run([exe, "-MGearman::Client", "-MGearman::Worker", "-e", "print 1"], check_rc=False)
    if probe.stdout != b"1":
        unavailable("Perl Gearman::Client / Gearman::Worker are not installed")

    class Perl:
        log = tmp_path / "perl-worker.log"
        release = tmp_path / "perl-release"
        counter = 0

        def client(self, code, *args, background=False):
            Perl.counter += 1
            path = tmp_path / f"client{Perl.counter}.pl"
            path.write_text(CLIENT_HEAD + code)
            return run_client_script(procs, [exe, path, server.port, *args], background)

        def worker(self, count):
            path = tmp_path / "worker.pl"
            path.write_text(WORKER_PL)
            return procs.start([exe, path, server.port, count, self.log, self.release])

        def idle_worker(self, count):
            proc = self.worker(count)
            wait_until(lambda: all(server.status().get(f, (0, 0, 0))[2] == 1 for f in PERL_FUNCTIONS),
                       10, "perl worker registered")
            return proc

        def log_lines(self):
            return log_lines(self.log)

    return Perl()


def test_perl_do_task_returns_worker_result(server, perl):
    worker = perl.idle_worker(3)
    out = perl.client(r"""
my @r;
push @r, ${ $c->do_task(reverse => "hello perl") };
push @r, unpack("H*", ${ $c->do_task(reverse => "a\0b\xff", { priority => "high" }) });
push @r, ${ $c->do_task(reverse => "low", { priority => "low" }) };
print $json->encode(\@r);
""")
    assert out == ["lrep olleh", "ff620061", "wol"]
    assert finish(worker)[0] == 0


def test_perl_dispatch_background_runs_on_later_worker(server, perl):
    out = perl.client(r"""
my $h = $c->dispatch_background(log => "from perl", { uniq => "perl-bg-1" });
my $st = $c->get_status($h);
print $json->encode([$h, $st->known, $st->running]);
""")
    handle = f"127.0.0.1:{server.port}//{HANDLE_PREFIX}:1"
    assert out == [handle, "1", "0"]
    assert server.status()["log"] == (1, 0, 0)
    assert server.admin("show unique jobs") == b"perl-bg-1\n.\n"
    assert finish(perl.worker(1))[0] == 0
    assert perl.log_lines() == ["from perl"]
    out = perl.client(r"""
my $st = $c->get_status($ARGV[0]);
print $json->encode([$st->known, $st->running]);
""", handle)
    assert out == ["0", "0"]
    assert server.status()["log"] == (0, 0, 0)


POLL_STATUS = r"""
# poll get_status(HANDLE) until its JSON is EXPECTED (or 10 s pass); print the last answer
my ($handle, $expected) = @ARGV;
my ($got, $end) = ("", time + 10);
while (time < $end) {
    my $st = $c->get_status($handle);
    $got = $json->encode([$st->known, $st->running, $st->progress]);
    last if $got eq $expected;
    select(undef, undef, undef, 0.01);
}
print $got;
"""


def test_perl_get_status_reports_the_progress_a_worker_set(server, perl):
    handle = perl.client(r"""print $json->encode($c->dispatch_background(hold => "h"));""")

    def status_becomes(expected):
        return perl.client(POLL_STATUS, handle, json.dumps(expected, separators=(",", ":")))

    assert status_becomes(["1", "0", ["0", "0"]]) == ["1", "0", ["0", "0"]]
    perl.worker(1)
    assert status_becomes(["1", "1", ["2", "5"]]) == ["1", "1", ["2", "5"]]
    assert server.status()["hold"] == (1, 1, 1)
    perl.release.touch()
    assert status_becomes(["0", "0", ["0", "0"]]) == ["0", "0", ["0", "0"]]


def test_perl_background_priorities_run_high_normal_low(server, perl):
    out = perl.client(r"""
my @h;
push @h, $c->dispatch_background(log => "low", { uniq => "a", priority => "low" });
push @h, $c->dispatch_background(log => "normal", { uniq => "b" });
push @h, $c->dispatch_background(log => "high", { uniq => "c", priority => "high" });
print $json->encode(\@h);
""")
    assert [h.split("//")[1] for h in out] == [f"{HANDLE_PREFIX}:{i}" for i in (1, 2, 3)]
    assert server.admin("prioritystatus") == b"log\t1\t1\t1\t0\n.\n"
    assert finish(perl.worker(3))[0] == 0
    assert perl.log_lines() == ["high", "normal", "low"]


def test_perl_taskset_collects_every_result(server, perl):
    worker = perl.idle_worker(40)
    out = perl.client(r"""
my %res;
my $ts = $c->new_task_set;
for my $i (1 .. 40) {
    $ts->add_task(reverse => "item-$i", {
        on_complete => sub { $res{$i} = ${ $_[0] } },
        on_fail => sub { $res{$i} = "FAILED" },
    });
}
$ts->wait(timeout => 15);
print $json->encode(\%res);
""")
    assert out == {str(i): f"item-{i}"[::-1] for i in range(1, 41)}
    assert finish(worker)[0] == 0


def test_perl_taskset_receives_status_updates(server, perl):
    perl.idle_worker(1)
    out = perl.client(r"""
my @log;
my $ts = $c->new_task_set;
$ts->add_task(progress => "p", {
    on_status => sub { push @log, "status:$_[0]/$_[1]" },
    on_complete => sub { push @log, "complete:${ $_[0] }" },
    on_fail => sub { push @log, "fail" },
});
$ts->wait(timeout => 10);
print $json->encode(\@log);
""")
    assert out == ["status:1/4", "status:3/4", "complete:progressed"]


def test_perl_worker_returning_undef_fails_the_task(server, perl):
    worker = perl.idle_worker(1)
    out = perl.client(r"""
my @log;
my $ts = $c->new_task_set;
$ts->add_task(fails => "f", {
    on_complete => sub { push @log, "complete" },
    on_fail => sub { push @log, "fail:$_[0]" },
});
$ts->wait(timeout => 10);
print $json->encode(\@log);
""")
    assert out == ["fail:jshandle fail"]
    assert finish(worker)[0] == 0
    assert server.status()["fails"] == (0, 0, 0)


def test_perl_worker_exception_reaches_client_that_asked_for_exceptions(server, perl):
    perl.idle_worker(1)
    out = perl.client(r"""
my @log;
my $ts = $c->new_task_set;
$ts->add_task(dies => "d", {
    on_exception => sub { push @log, "exception:" . ${ Storable::thaw($_[0]) } },
    on_complete => sub { push @log, "complete" },
    on_fail => sub { push @log, "fail" },
});
$ts->wait(timeout => 10);
print $json->encode(\@log);
""")
    assert out == ["exception:worker died\n"]


def test_perl_same_uniq_tasks_share_one_execution(server, perl):
    client = perl.client(r"""
my @log;
my $ts = $c->new_task_set;
for my $i (1 .. 3) {
    $ts->add_task(log => "payload-$i", { uniq => "perl-same", on_complete => sub { push @log, ${ $_[0] } } });
}
$ts->wait(timeout => 15);
print $json->encode(\@log);
""", background=True)
    wait_until(lambda: status_unique(server, "perl-same")[4] == 3, 10, "three tasks attached")
    assert server.status()["log"] == (1, 0, 0)
    worker = perl.worker(1)
    rc, out, err = finish(client)
    assert (rc, err) == (0, b"")
    assert json.loads(out) == ["ok:payload-1"] * 3
    assert finish(worker)[0] == 0
    assert perl.log_lines() == ["payload-1"]


def test_perl_worker_serves_gearman_cli_client(server, perl):
    gm = need_tool("gearman")
    worker = perl.idle_worker(1)
    res = run([gm, "-h", "127.0.0.1", "-p", server.port, "-f", "reverse", "--", "cli to perl"])
    assert res.stdout == b"lrep ot ilc"
    assert finish(worker)[0] == 0


def test_perl_worker_outliving_its_timeout_dies_on_the_error_and_job_reruns(server, perl):
    perl.client(r"""print $json->encode($c->dispatch_background(overrun => "o"));""")
    first = perl.worker(2)                        # 2: it grabs again after the first run
    wait_until(lambda: perl.log_lines() == ["o"], 10, "the first run started")
    wait_status(server, "overrun", (1, 0, 1))     # queued again while the first run goes on
    perl.release.touch()
    # its late WORK_COMPLETE is refused; Gearman::Worker dies on the ERROR at its next grab
    rc, out, err = finish(first)
    assert (rc, out) == (255, b"")
    assert err == (b"unexpected packet type: error "
                   b"[JOB_NOT_FOUND -- Job given in work result not found]\n")
    wait_status(server, "overrun", (1, 0, 0))
    assert finish(perl.worker(1))[0] == 0
    assert perl.log_lines() == ["o", "o"]
    wait_status(server, "overrun", (0, 0, 0))


@pytest.mark.skipif(IMPL == "c", reason="C 1.1.20 sends WORK_FAIL as the handle and a stray NUL, "
                                        "which Gearman::Client dies on (issue #12)")
def test_perl_worker_exception_fails_the_task_of_client_without_exceptions(server, perl):
    perl.idle_worker(1)
    out = perl.client(r"""
my $plain = Gearman::Client->new(job_servers => ["127.0.0.1:$port"]);
my @log;
my $ts = $plain->new_task_set;
$ts->add_task(dies => "d", {
    on_exception => sub { push @log, "exception" },
    on_complete => sub { push @log, "complete" },
    on_fail => sub { push @log, "fail:$_[0]" },
});
$ts->wait(timeout => 10);
print $json->encode(\@log);
""")
    assert out == ["fail:jshandle fail"]
    assert server.status()["dies"][:2] == (0, 0)
