/*
 * hold: map anonymous private memory, write to it, report readiness and wait to be dumped.
 *
 *   hold sparse PAGES READY   map PAGES pages and touch every other one, so that each touched
 *                             page is its own pagemap entry (PAGES / 2 entries)
 *   hold dense MIB READY      map MIB MiB and fill all of it with varying non-zero words, so
 *                             that the pagemap holds a few large entries
 *   hold mappings N READY     make N one-page mappings (alternately read-only and writable,
 *                             so the kernel cannot merge them), each written once
 *
 * Once the memory is written, the program writes its pid to READY (through a temporary name
 * and rename, so a reader never sees half a file) and sleeps until killed.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static void die(const char *what)
{
	fprintf(stderr, "hold: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void *map(size_t len)
{
	void *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (mem == MAP_FAILED)
		die("mmap");
	return mem;
}

static void touch_sparse(size_t pages, size_t page)
{
	unsigned char *mem = map(pages * page);

	/* A gap between touched pages keeps the kernel and CRIU from merging them. */
	for (size_t i = 0; i < pages; i += 2)
		mem[i * page] = (unsigned char)(i / 2 % 255 + 1);
}

static void fill_dense(size_t mib)
{
	size_t words = mib * 1024 * 1024 / sizeof(uint64_t);
	uint64_t *mem = map(words * sizeof(uint64_t));
	uint64_t x = 0x9e3779b97f4a7c15ULL;

	/* xorshift64 never yields zero from a non-zero seed, so no page reads as zeros. */
	for (size_t i = 0; i < words; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		mem[i] = x;
	}
}

static void split_mappings(size_t count, size_t page)
{
	unsigned char *mem = map(count * page);

	for (size_t i = 0; i < count; i++)
		mem[i * page] = (unsigned char)(i % 255 + 1);
	/* Every other page read-only: neighbours differ in protection, so each is its own VMA. */
	for (size_t i = 0; i < count; i += 2)
		if (mprotect(mem + i * page, page, PROT_READ) != 0)
			die("mprotect");
}

static void report_ready(const char *path)
{
	char tmp[4096];
	FILE *file;

	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	file = fopen(tmp, "w");
	if (!file)
		die(tmp);
	fprintf(file, "%d\n", (int)getpid());
	if (fclose(file) != 0)
		die(tmp);
	if (rename(tmp, path) != 0)
		die(path);
}

int main(int argc, char **argv)
{
	size_t count;

	if (argc != 4) {
		fprintf(stderr, "usage: hold sparse|dense|mappings COUNT READY\n");
		return 2;
	}
	count = strtoull(argv[2], NULL, 10);
	if (count == 0) {
		fprintf(stderr, "hold: bad size %s\n", argv[2]);
		return 2;
	}

	if (strcmp(argv[1], "sparse") == 0)
		touch_sparse(count, (size_t)sysconf(_SC_PAGESIZE));
	else if (strcmp(argv[1], "dense") == 0)
		fill_dense(count);
	else if (strcmp(argv[1], "mappings") == 0)
		split_mappings(count, (size_t)sysconf(_SC_PAGESIZE));
	else {
		fprintf(stderr, "hold: unknown layout %s\n", argv[1]);
		return 2;
	}

	report_ready(argv[3]);
	for (;;)
		pause();
}
