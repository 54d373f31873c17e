/*
 * race_map_files: a hostile client of the daemon. It races IOASID_MAP_DMA
 * against swapping the memory under the address it maps: a writable shared
 * mapping of a file of its own, then, at the same address, a read-only
 * shared mapping of a file it may only read (the victim), back and forth.
 * Each map that succeeds is followed by a DMA write through the new IOVA,
 * and now and then a DMA read checked against the victim's bytes. A daemon
 * that mapped the victim for DMA would let the device change it.
 *
 * Usage: race_map_files NODE OWN_FILE VICTIM_FILE MILLISECONDS
 *   NODE        a /dev/vfio/devices/devN node (bound and attached here)
 *   OWN_FILE    a file the client may write, at least PAGES pages long
 *   VICTIM_FILE a file the client may only read, as long
 * Prints one line of counts. Exit status 0: no DMA reached the victim as far
 * as the client can tell (the caller also compares the victim's bytes);
 * 1: a DMA read returned the victim's bytes, or a step failed; 2: usage.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <linux/vfio.h>
#include <linux/ioasid.h>

#include "edu.h"

/* Every map uses a page at a new offset, so the daemon never finds the
 * range in its cache of idle aliases and has to open it again. */
#define PAGES		256
#define IOVA_SCRATCH	0x100000
#define IOVA_RACED	0x200000

static atomic_int stop;
static atomic_uint page_index;
static atomic_ulong swaps;
static void *raced;		/* the address whose memory is swapped */
static int own_fd, victim_fd;

/* Put the victim's page, read-only, at `raced`; then the client's own page,
 * writable; over and over. */
static void *swapper(void *unused)
{
	(void)unused;
	while (!atomic_load(&stop)) {
		off_t off = (off_t)atomic_load(&page_index) * EDU_PAGE;

		if (mmap(raced, EDU_PAGE, PROT_READ, MAP_SHARED | MAP_FIXED,
			 victim_fd, off) == MAP_FAILED ||
		    mmap(raced, EDU_PAGE, PROT_READ | PROT_WRITE,
			 MAP_SHARED | MAP_FIXED, own_fd, off) == MAP_FAILED) {
			perror("race_map_files: mmap");
			exit(1);
		}
		atomic_fetch_add(&swaps, 1);
	}
	return NULL;
}

static int map_dma(int ioasid_fd, int ioasid, uint64_t iova, void *vaddr)
{
	struct ioasid_dma_map map = {
		.argsz = sizeof(map),
		.flags = IOASID_DMA_MAP_FLAG_READ | IOASID_DMA_MAP_FLAG_WRITE,
		.ioasid = ioasid,
		.vaddr = (uintptr_t)vaddr,
		.iova = iova,
		.size = EDU_PAGE,
	};

	return ioctl(ioasid_fd, IOASID_MAP_DMA, &map);
}

static void unmap_dma(int ioasid_fd, int ioasid, uint64_t iova)
{
	struct ioasid_dma_unmap unmap = {
		.argsz = sizeof(unmap),
		.ioasid = ioasid,
		.iova = iova,
		.size = EDU_PAGE,
	};

	if (ioctl(ioasid_fd, IOASID_UNMAP_DMA, &unmap))
		edu_fail("IOASID_UNMAP_DMA");
}

int main(int argc, char **argv)
{
	struct vfio_attach_ioasid attach = { .argsz = sizeof(attach) };
	unsigned long ok = 0, efault = 0, eagain = 0, other = 0, checks = 0;
	unsigned char victim[EDU_LENGTH], own_pattern[EDU_LENGTH];
	unsigned char *scratch;
	struct edu edu;
	uint64_t deadline;
	pthread_t thread;
	int ioasid_fd, ioasid, memfd;

	if (argc != 5) {
		fprintf(stderr, "usage: race_map_files NODE OWN_FILE VICTIM_FILE MILLISECONDS\n");
		return 2;
	}
	edu_program = "race_map_files";
	setvbuf(stdout, NULL, _IOLBF, 0);

	edu_open(&edu, argv[1]);
	ioasid_fd = open("/dev/ioasid", O_RDWR | O_CLOEXEC);
	if (ioasid_fd < 0)
		edu_fail("open /dev/ioasid");
	if (ioctl(edu.fd, VFIO_BIND_IOASID_FD, ioasid_fd))
		edu_fail("VFIO_BIND_IOASID_FD");
	ioasid = ioctl(ioasid_fd, IOASID_ALLOC);
	if (ioasid <= 0)
		edu_fail("IOASID_ALLOC");
	attach.ioasid = ioasid;
	if (ioctl(edu.fd, VFIO_ATTACH_IOASID, &attach))
		edu_fail("VFIO_ATTACH_IOASID");
	edu_enable(&edu);

	/* The client's own scratch page, mapped once, to see what DMA reads. */
	memfd = memfd_create("race-scratch", MFD_CLOEXEC);
	if (memfd < 0 || ftruncate(memfd, EDU_PAGE))
		edu_fail("memfd");
	scratch = mmap(NULL, EDU_PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	if (scratch == MAP_FAILED)
		edu_fail("mmap scratch");
	if (map_dma(ioasid_fd, ioasid, IOVA_SCRATCH, scratch))
		edu_fail("IOASID_MAP_DMA of the scratch page");

	own_fd = open(argv[2], O_RDWR | O_CLOEXEC);
	victim_fd = open(argv[3], O_RDONLY | O_CLOEXEC);
	if (own_fd < 0 || victim_fd < 0)
		edu_fail("open %s / %s", argv[2], argv[3]);
	if (pread(victim_fd, victim, EDU_LENGTH, 0) != EDU_LENGTH)
		edu_fail("reading the victim");
	raced = mmap(NULL, EDU_PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, own_fd, 0);
	if (raced == MAP_FAILED)
		edu_fail("mmap own file");

	/* The device's buffer holds the bytes each DMA write puts at the raced
	 * IOVA: 'W's, unlike both files' contents. */
	memset(own_pattern, 'W', sizeof(own_pattern));
	memcpy(scratch, own_pattern, EDU_LENGTH);
	edu_dma(&edu, IOVA_SCRATCH, EDU_BUFFER, 0);

	if (pthread_create(&thread, NULL, swapper, NULL))
		edu_fail("pthread_create");
	deadline = edu_now_ms() + strtoull(argv[4], NULL, 0);
	while (edu_now_ms() < deadline) {
		atomic_store(&page_index, (atomic_load(&page_index) + 1) % PAGES);
		if (map_dma(ioasid_fd, ioasid, IOVA_RACED,
			    (char *)raced) != 0) {
			if (errno == EFAULT)
				efault++;
			else if (errno == EAGAIN)
				eagain++;
			else
				other++;
			continue;
		}
		ok++;
		/* Write through the new IOVA. */
		edu_dma(&edu, EDU_BUFFER, IOVA_RACED, EDU_DMA_TO_RAM);
		if (ok % 4 == 1) {
			/* Read through it: never the victim's bytes. */
			memset(scratch, 0, EDU_LENGTH);
			edu_dma(&edu, IOVA_RACED, EDU_BUFFER, 0);
			edu_dma(&edu, EDU_BUFFER, IOVA_SCRATCH, EDU_DMA_TO_RAM);
			checks++;
			if (memcmp(scratch, victim, EDU_LENGTH) == 0) {
				printf("race_map_files: a DMA read through IOVA %#x "
				       "returned the victim's bytes\n", IOVA_RACED);
				return 1;
			}
			memcpy(scratch, own_pattern, EDU_LENGTH);
			edu_dma(&edu, IOVA_SCRATCH, EDU_BUFFER, 0);
		}
		unmap_dma(ioasid_fd, ioasid, IOVA_RACED);
	}
	atomic_store(&stop, 1);
	pthread_join(thread, NULL);
	printf("race_map_files: maps %lu, refused EFAULT %lu, EAGAIN %lu, other %lu; "
	       "swaps %lu; read checks %lu\n", ok, efault, eagain, other,
	       atomic_load(&swaps), checks);
	return other ? 1 : 0;
}
