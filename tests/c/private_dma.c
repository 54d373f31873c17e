/* Private memory mapped for DMA by the client's own thread (issue 14): one
 * check per run, chosen by argv[1], against the node of tests/c/private_map.h.
 * Every check proves itself with bytes that crossed the IOMMU: page 0 of a
 * two-page buffer holds a pattern, the device copies it to page 1, the
 * client reads page 1.
 *
 *   private_dma KIND [IOVA]
 *
 * KIND: malloc, stack, anon, file (MAP_PRIVATE of a file), after (written
 * after the map), regs (sentinels in callee-saved registers, below rsp,
 * errno, signal mask and a pending signal across a raw ioctl), threads (a
 * second thread spins and takes signals meanwhile), memlock (RLIMIT_MEMLOCK
 * without CAP_IPC_LOCK: ENOMEM over it, VmLck charged under it), fork (the
 * parent's DMA reaches the parent's pages after fork), refused (the map
 * must fail with EFAULT: run under a tracer), seccomp (under a seccomp
 * filter, even one that allows everything, the map must fail with EFAULT),
 * loop (map, DMA and unmap private memory until killed; prints "looping"
 * first), held (a map the daemon holds; must never return: the test kills
 * someone).
 * Prints "PASS KIND" and exits 0, or "FAIL ..." and exits 1. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>

#ifdef PRIVATE_MAP_IOASID
#include "private_map_ioasid.h"
#else
#include "private_map.h"
#endif

#define PAGE 4096u
#define LEN 3000u

static uint64_t iova = 0x100000;
static int node = -1;

#define FAIL(...)                                 \
	do {                                      \
		printf("FAIL ");                  \
		printf(__VA_ARGS__);              \
		printf("\n");                     \
		exit(1);                          \
	} while (0)

static uint8_t pat(unsigned seed, unsigned i)
{
	return (uint8_t)(seed * 31 + i * 13 + (i >> 8));
}

static void fill(uint8_t *p, unsigned seed)
{
	for (unsigned i = 0; i < PAGE; i++)
		p[i] = pat(seed, i);
}

static void *align_up(void *p)
{
	return (void *)(((uintptr_t)p + PAGE - 1) & ~(uintptr_t)(PAGE - 1));
}

/* The device copies page 0 to page 1; page 1 must then hold the pattern. */
static void dma_and_check(uint8_t *buf, unsigned seed, const char *what)
{
	memset(buf + PAGE, 0, PAGE);
	int r = target_dma(node, iova, iova + PAGE, LEN);
	if (r)
		FAIL("%s: DMA: %s", what, strerror(-r));
	for (unsigned i = 0; i < LEN; i++)
		if (buf[PAGE + i] != pat(seed, i))
			FAIL("%s: byte %u is %#x, expected %#x (the device did not reach these pages)",
			     what, i, buf[PAGE + i], pat(seed, i));
}

static void map_or_fail(uint8_t *buf, const char *what)
{
	int r = target_map(node, iova, buf, 2 * PAGE);
	if (r)
		FAIL("%s: map: %s", what, strerror(-r));
}

static void unmap_or_fail(const char *what)
{
	int r = target_unmap(node, iova, 2 * PAGE);
	if (r < 0)
		FAIL("%s: unmap: %s", what, strerror(-r));
}

static void roundtrip(uint8_t *buf, unsigned seed, const char *what)
{
	fill(buf, seed);
	map_or_fail(buf, what);
	dma_and_check(buf, seed, what);
	unmap_or_fail(what);
}

static uint8_t *anon(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		FAIL("mmap: %s", strerror(errno));
	return p;
}

static void on_stack(void)
{
	uint8_t frame[3 * PAGE];
	uint8_t *buf = align_up(frame);
	roundtrip(buf, 3, "stack");
	__asm__ volatile("" ::"r"(frame) : "memory"); /* keep the frame */
}

static void private_file(void)
{
	char path[] = "/tmp/private-dma-XXXXXX";
	int fd = mkstemp(path);
	if (fd < 0)
		FAIL("mkstemp: %s", strerror(errno));
	unlink(path);
	uint8_t orig[2 * PAGE];
	memset(orig, 0x77, sizeof(orig));
	if (write(fd, orig, sizeof(orig)) != (ssize_t)sizeof(orig))
		FAIL("write: %s", strerror(errno));
	uint8_t *buf = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	if (buf == MAP_FAILED)
		FAIL("mmap file: %s", strerror(errno));
	roundtrip(buf, 4, "file");
	/* Private: the file itself never saw the device's write. */
	uint8_t back[PAGE];
	if (pread(fd, back, PAGE, PAGE) != PAGE || back[0] != 0x77 || back[LEN - 1] != 0x77)
		FAIL("file: the file's page 1 changed under MAP_PRIVATE");
	close(fd);
}

static void written_after(void)
{
	uint8_t *buf = anon(2 * PAGE);
	memset(buf, 0, 2 * PAGE);
	map_or_fail(buf, "after");
	fill(buf, 5); /* after the map: the device must see these bytes */
	dma_and_check(buf, 5, "after");
	fill(buf, 6); /* and again */
	dma_and_check(buf, 6, "after (twice)");
	unmap_or_fail("after");
}

/* --- regs: a raw ioctl with sentinels --------------------------------- */

static volatile uint64_t in_fd, in_cmd, in_arg;
static volatile uint64_t after_regs[13];
static volatile uint64_t below_bad;
#define SENT 0x5a5a1234deadbeefULL

static long sentinel_ioctl(int fd, unsigned long cmd, void *arg)
{
	in_fd = (uint64_t)fd;
	in_cmd = cmd;
	in_arg = (uintptr_t)arg;
	/* rbx and rbp are saved by hand (the compiler may own rbp); inputs and
	 * outputs go through statics (RIP-relative), never the stack, which
	 * the block fills below rsp with a pattern. */
	__asm__ volatile(
		"push %%rbp\n\t"
		"push %%rbx\n\t"
		"lea -4096(%%rsp), %%rdi\n\t"
		"mov $512, %%ecx\n\t"
		"movabs $0x5a5a1234deadbeef, %%rax\n\t"
		"rep stosq\n\t"
		"movabs $0x1111111111111111, %%rbx\n\t"
		"movabs $0x2222222222222222, %%rbp\n\t"
		"movabs $0x3333333333333333, %%r12\n\t"
		"movabs $0x4444444444444444, %%r13\n\t"
		"movabs $0x5555555555555555, %%r14\n\t"
		"movabs $0x6666666666666666, %%r15\n\t"
		"movabs $0x8888888888888888, %%r8\n\t"
		"movabs $0x9999999999999999, %%r9\n\t"
		"movabs $0xaaaaaaaaaaaaaaaa, %%r10\n\t"
		"mov in_fd(%%rip), %%rdi\n\t"
		"mov in_cmd(%%rip), %%rsi\n\t"
		"mov in_arg(%%rip), %%rdx\n\t"
		"mov $16, %%eax\n\t" /* SYS_ioctl */
		"syscall\n\t"
		"mov %%rax, after_regs+0(%%rip)\n\t"
		"mov %%rbx, after_regs+8(%%rip)\n\t"
		"mov %%rbp, after_regs+16(%%rip)\n\t"
		"mov %%r12, after_regs+24(%%rip)\n\t"
		"mov %%r13, after_regs+32(%%rip)\n\t"
		"mov %%r14, after_regs+40(%%rip)\n\t"
		"mov %%r15, after_regs+48(%%rip)\n\t"
		"mov %%r8, after_regs+56(%%rip)\n\t"
		"mov %%r9, after_regs+64(%%rip)\n\t"
		"mov %%r10, after_regs+72(%%rip)\n\t"
		"mov %%rdi, after_regs+80(%%rip)\n\t"
		"mov %%rsi, after_regs+88(%%rip)\n\t"
		"mov %%rdx, after_regs+96(%%rip)\n\t"
		"lea -4096(%%rsp), %%rdi\n\t"
		"mov $512, %%ecx\n\t"
		"movabs $0x5a5a1234deadbeef, %%rax\n\t"
		"repe scasq\n\t"
		"setne %%al\n\t"
		"movzbq %%al, %%rax\n\t"
		"add %%rcx, %%rax\n\t"
		"mov %%rax, below_bad(%%rip)\n\t"
		"pop %%rbx\n\t"
		"pop %%rbp\n\t"
		:
		:
		: "rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
		  "r15", "memory", "cc");
	return (long)after_regs[0];
}

static volatile sig_atomic_t usr2_seen;
static void on_usr2(int sig)
{
	(void)sig;
	usr2_seen++;
}

static void registers(void)
{
	uint8_t *buf = anon(2 * PAGE);
	fill(buf, 7);
	signal(SIGUSR2, on_usr2);
	sigset_t usr2, before, now, pending;
	sigemptyset(&usr2);
	sigaddset(&usr2, SIGUSR2);
	sigprocmask(SIG_BLOCK, &usr2, NULL);
	raise(SIGUSR2);
	sigprocmask(SIG_BLOCK, NULL, &before);
	unsigned long cmd;
	void *arg = target_map_arg(iova, buf, 2 * PAGE, &cmd);
	errno = 4242;
	long ret = sentinel_ioctl(node, cmd, arg);
	int err = errno;
	if (ret != 0)
		FAIL("regs: raw ioctl returned %ld", ret);
	const uint64_t want[13] = { 0,
				    0x1111111111111111ULL,
				    0x2222222222222222ULL,
				    0x3333333333333333ULL,
				    0x4444444444444444ULL,
				    0x5555555555555555ULL,
				    0x6666666666666666ULL,
				    0x8888888888888888ULL,
				    0x9999999999999999ULL,
				    0xaaaaaaaaaaaaaaaaULL,
				    in_fd,
				    in_cmd,
				    in_arg };
	static const char *names[13] = { "rax", "rbx", "rbp", "r12", "r13", "r14", "r15",
					 "r8",  "r9",  "r10", "rdi", "rsi", "rdx" };
	for (int i = 1; i < 13; i++)
		if (after_regs[i] != want[i])
			FAIL("regs: %s is %#llx, expected %#llx", names[i],
			     (unsigned long long)after_regs[i], (unsigned long long)want[i]);
	if (below_bad)
		FAIL("regs: the 4 KiB below rsp changed");
	if (err != 4242)
		FAIL("regs: errno changed to %d", err);
	sigprocmask(SIG_BLOCK, NULL, &now);
	for (int s = 1; s < 65; s++)
		if (sigismember(&before, s) != sigismember(&now, s))
			FAIL("regs: signal mask changed for signal %d", s);
	sigpending(&pending);
	if (!sigismember(&pending, SIGUSR2) || usr2_seen)
		FAIL("regs: the pending SIGUSR2 was lost or delivered while blocked");
	sigprocmask(SIG_UNBLOCK, &usr2, NULL);
	if (usr2_seen != 1)
		FAIL("regs: SIGUSR2 not delivered once unblocked");
	dma_and_check(buf, 7, "regs");
	unmap_or_fail("regs");
}

/* --- threads: a busy second thread taking signals -------------------- */

static volatile uint64_t spins;
static volatile sig_atomic_t alarms;
static void on_alarm(int sig)
{
	(void)sig;
	alarms++;
}

static void *spin(void *arg)
{
	(void)arg;
	sigset_t alrm;
	sigemptyset(&alrm);
	sigaddset(&alrm, SIGALRM);
	pthread_sigmask(SIG_UNBLOCK, &alrm, NULL); /* blocked in main only */
	struct sigevent ev = { .sigev_notify = SIGEV_THREAD_ID, .sigev_signo = SIGALRM };
	ev._sigev_un._tid = (pid_t)syscall(SYS_gettid);
	timer_t t;
	if (timer_create(CLOCK_MONOTONIC, &ev, &t))
		FAIL("timer_create: %s", strerror(errno));
	struct itimerspec its = { .it_value = { 0, 1000000 }, .it_interval = { 0, 1000000 } };
	timer_settime(t, 0, &its, NULL);
	for (;;)
		spins++;
	return NULL;
}

static void threads(void)
{
	signal(SIGALRM, on_alarm);
	sigset_t alrm;
	sigemptyset(&alrm);
	sigaddset(&alrm, SIGALRM);
	pthread_sigmask(SIG_BLOCK, &alrm, NULL); /* only the spinner takes them */
	pthread_t th;
	pthread_create(&th, NULL, spin, NULL);
	while (alarms < 3)
		;
	uint8_t *buf = anon(2 * PAGE);
	int moved = 0;
	for (unsigned round = 0; round < 5; round++) {
		fill(buf, 10 + round);
		uint64_t s0 = spins;
		int a0 = alarms;
		map_or_fail(buf, "threads");
		if (spins != s0 && alarms != a0)
			moved++;
		dma_and_check(buf, 10 + round, "threads");
		unmap_or_fail("threads");
	}
	if (!moved)
		FAIL("threads: the second thread never ran during a map");
	printf("threads: the spinner ran and took signals during %d of 5 maps\n", moved);
}

/* --- memlock ---------------------------------------------------------- */

static long vmlck_kb(void)
{
	FILE *f = fopen("/proc/self/status", "r");
	char line[256];
	long kb = -1;
	while (f && fgets(line, sizeof(line), f))
		if (sscanf(line, "VmLck: %ld kB", &kb) == 1)
			break;
	if (f)
		fclose(f);
	return kb;
}

static void memlock(void)
{
	struct __user_cap_header_struct h = { .version = _LINUX_CAPABILITY_VERSION_3 };
	struct __user_cap_data_struct d[2];
	if (syscall(SYS_capget, &h, d))
		FAIL("capget: %s", strerror(errno));
	d[0].effective &= ~(1u << CAP_IPC_LOCK);
	d[0].permitted &= ~(1u << CAP_IPC_LOCK);
	if (syscall(SYS_capset, &h, d))
		FAIL("capset: %s", strerror(errno));
	struct rlimit rl = { 64 * 1024, 64 * 1024 };
	if (setrlimit(RLIMIT_MEMLOCK, &rl))
		FAIL("setrlimit: %s", strerror(errno));
	size_t big = 1 << 20;
	uint8_t *p = anon(big);
	memset(p, 1, big);
	int r = target_map(node, iova, p, big);
	if (r != -ENOMEM)
		FAIL("memlock: a 1 MiB map over a 64 KiB RLIMIT_MEMLOCK gave %s, expected ENOMEM",
		     r ? strerror(-r) : "success");
	long before = vmlck_kb();
	uint8_t *buf = anon(2 * PAGE);
	fill(buf, 8);
	map_or_fail(buf, "memlock (under the limit)");
	long during = vmlck_kb();
	if (during - before != 8)
		FAIL("memlock: VmLck %ld kB -> %ld kB, expected +8 (type1 charges the client)",
		     before, during);
	dma_and_check(buf, 8, "memlock");
	unmap_or_fail("memlock");
	if (vmlck_kb() != before)
		FAIL("memlock: VmLck %ld kB after the unmap, expected %ld", vmlck_kb(), before);
	printf("memlock: ENOMEM over the limit; VmLck %ld -> %ld -> %ld kB\n", before, during,
	       before);
}

/* --- fork ------------------------------------------------------------- */

static void forked(void)
{
	uint8_t *buf = anon(2 * PAGE);
	memset(buf, 0, 2 * PAGE);
	map_or_fail(buf, "fork");
	int ready[2], go[2];
	if (pipe(ready) || pipe(go))
		FAIL("pipe: %s", strerror(errno));
	pid_t child = fork();
	if (child < 0)
		FAIL("fork: %s", strerror(errno));
	if (child == 0) {
		char c;
		memset(buf, 0xcc, 2 * PAGE); /* the child's own copies */
		if (write(ready[1], "r", 1) != 1 || read(go[0], &c, 1) != 1)
			_exit(2);
		for (unsigned i = 0; i < LEN; i++)
			if (buf[PAGE + i] != 0xcc)
				_exit(3); /* the parent's DMA landed in the child */
		_exit(0);
	}
	char c;
	if (read(ready[0], &c, 1) != 1)
		FAIL("fork: child not ready");
	fill(buf, 9); /* the parent writes after the fork */
	dma_and_check(buf, 9, "fork (parent)");
	if (write(go[1], "g", 1) != 1)
		FAIL("fork: write");
	int status;
	waitpid(child, &status, 0);
	if (!WIFEXITED(status) || WEXITSTATUS(status))
		FAIL("fork: child status %#x (3: the DMA reached the child's pages)", status);
	unmap_or_fail("fork");
}

int main(int argc, char **argv)
{
	if (argc < 2)
		FAIL("usage: private_dma KIND [IOVA]");
	const char *kind = argv[1];
	if (argc > 2)
		iova = strtoull(argv[2], NULL, 0);
	setvbuf(stdout, NULL, _IONBF, 0);
	node = target_open();
	if (node < 0)
		FAIL("open: %s", strerror(errno));
	if (!strcmp(kind, "malloc")) {
		uint8_t *p = malloc(3 * PAGE);
		roundtrip(align_up(p), 1, "malloc");
		free(p);
	} else if (!strcmp(kind, "stack")) {
		on_stack();
	} else if (!strcmp(kind, "anon")) {
		roundtrip(anon(2 * PAGE), 2, "anon");
	} else if (!strcmp(kind, "file")) {
		private_file();
	} else if (!strcmp(kind, "after")) {
		written_after();
	} else if (!strcmp(kind, "regs")) {
		registers();
	} else if (!strcmp(kind, "threads")) {
		threads();
	} else if (!strcmp(kind, "memlock")) {
		memlock();
	} else if (!strcmp(kind, "fork")) {
		forked();
	} else if (!strcmp(kind, "refused")) {
		uint8_t *p = malloc(3 * PAGE);
		int r = target_map(node, iova, align_up(p), 2 * PAGE);
		if (r != -EFAULT)
			FAIL("refused: map gave %s, expected EFAULT", r ? strerror(-r) : "success");
	} else if (!strcmp(kind, "seccomp")) {
		struct sock_filter allow = BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
		struct sock_fprog prog = { .len = 1, .filter = &allow };
		if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) ||
		    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog))
			FAIL("seccomp: installing the filter: %s", strerror(errno));
		uint8_t *p = malloc(3 * PAGE);
		int r = target_map(node, iova, align_up(p), 2 * PAGE);
		if (r != -EFAULT)
			FAIL("seccomp: map gave %s, expected EFAULT", r ? strerror(-r) : "success");
	} else if (!strcmp(kind, "loop")) {
		uint8_t *buf = anon(2 * PAGE);
		printf("looping\n");
		for (unsigned round = 0;; round++) {
			fill(buf, round & 0xff);
			map_or_fail(buf, "loop");
			dma_and_check(buf, round & 0xff, "loop");
			unmap_or_fail("loop");
		}
	} else if (!strcmp(kind, "held")) {
		uint8_t *p = anon(2 * PAGE);
		memset(p, 1, 2 * PAGE);
		int r = target_map_held(node, iova, p, 2 * PAGE);
		FAIL("held: the held map returned (%s)", r ? strerror(-r) : "success");
	} else {
		FAIL("unknown kind %s", kind);
	}
	printf("PASS %s\n", kind);
	return 0;
}
