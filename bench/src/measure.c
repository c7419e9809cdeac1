/*
 * measure: run a command once and print its wall time and peak memory.
 *
 *   measure OUT COMMAND [ARG...]
 *
 * The command's stdout goes to OUT (truncated first; /dev/null to discard it), its stderr is
 * inherited. On stdout, measure prints one line: "<wall ns> <max RSS KiB> <exit status>",
 * where the exit status is 128 + the signal number if the command was killed. Measuring here
 * rather than around a `date` call keeps the shell's own fork and exec out of the time.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	struct rusage usage;
	long long start, end;
	int out, status, code;
	pid_t pid;

	if (argc < 3) {
		fprintf(stderr, "usage: measure OUT COMMAND [ARG...]\n");
		return 2;
	}
	out = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (out < 0) {
		fprintf(stderr, "measure: %s: %s\n", argv[1], strerror(errno));
		return 2;
	}

	start = now_ns();
	pid = fork();
	if (pid < 0) {
		fprintf(stderr, "measure: fork: %s\n", strerror(errno));
		return 2;
	}
	if (pid == 0) {
		dup2(out, STDOUT_FILENO);
		close(out);
		execvp(argv[2], argv + 2);
		fprintf(stderr, "measure: %s: %s\n", argv[2], strerror(errno));
		_exit(127);
	}
	close(out);

	if (wait4(pid, &status, 0, &usage) < 0) {
		fprintf(stderr, "measure: wait4: %s\n", strerror(errno));
		return 2;
	}
	end = now_ns();

	code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
	printf("%lld %ld %d\n", end - start, usage.ru_maxrss, code);
	return code;
}
