/*
 * edu.h: QEMU's edu DMA test device driven through a VFIO device file with
 * pread/pwrite (the daemon's nodes offer no mmap), for the test programs of
 * tests/c/. Header-only: every program is one translation unit.
 *
 * A program sets `edu_program` to its name; edu_fail() prints the step that
 * failed with errno's text and exits 1.
 */
#ifndef TESTS_C_EDU_H
#define TESTS_C_EDU_H

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include <linux/vfio.h>

/* BAR0 registers (QEMU hw/misc/edu.c). */
#define EDU_ID			0x00
#define EDU_ID_VALUE		0x010000edu
#define EDU_DMA_SRC		0x80
#define EDU_DMA_DST		0x88
#define EDU_DMA_COUNT		0x90
#define EDU_DMA_CMD		0x98
#define EDU_DMA_START		0x1
#define EDU_DMA_TO_RAM		0x2	/* direction: device buffer -> memory */
#define EDU_DMA_IRQ		0x4	/* raise the DMA interrupt when done */
#define EDU_BUFFER		0x40000	/* the device's own 4 KiB buffer */

#define EDU_PAGE		4096
/* Shorter than the edu buffer: QEMU 7.2 aborts on exactly 4096 bytes. */
#define EDU_LENGTH		3000
#define EDU_WAIT_MS		10000

static const char *edu_program = "edu";

static void __attribute__((noreturn, format(printf, 1, 2)))
edu_fail(const char *fmt, ...)
{
	va_list ap;
	int err = errno;

	printf("%s: FAILED: ", edu_program);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	if (err)
		printf(" (%s)", strerror(err));
	printf("\n");
	exit(1);
}

/* An open VFIO device file with an edu behind it. */
struct edu {
	int fd;
	uint64_t config;	/* offset of PCI config space in the file */
	uint64_t bar0;		/* offset of BAR0 in the file */
};

static void edu_open(struct edu *edu, const char *node)
{
	memset(edu, 0, sizeof(*edu));
	edu->fd = open(node, O_RDWR | O_CLOEXEC);
	if (edu->fd < 0)
		edu_fail("open %s", node);
}

static uint64_t edu_region(const struct edu *edu, unsigned int index)
{
	struct vfio_region_info info = { .argsz = sizeof(info), .index = index };

	if (ioctl(edu->fd, VFIO_DEVICE_GET_REGION_INFO, &info))
		edu_fail("VFIO_DEVICE_GET_REGION_INFO(%u)", index);
	return info.offset;
}

static uint32_t edu_rd32(const struct edu *edu, uint64_t reg)
{
	uint32_t v;

	errno = 0;
	if (pread(edu->fd, &v, 4, edu->bar0 + reg) != 4)
		edu_fail("reading BAR0 register %#llx", (unsigned long long)reg);
	return v;
}

static void edu_wr32(const struct edu *edu, uint64_t reg, uint32_t v)
{
	errno = 0;
	if (pwrite(edu->fd, &v, 4, edu->bar0 + reg) != 4)
		edu_fail("writing BAR0 register %#llx", (unsigned long long)reg);
}

/* Find the regions, enable memory space and bus mastering, check the id.
 * The device must be usable (bound, on the daemon's nodes). */
static void edu_enable(struct edu *edu)
{
	uint16_t command;

	edu->config = edu_region(edu, VFIO_PCI_CONFIG_REGION_INDEX);
	edu->bar0 = edu_region(edu, VFIO_PCI_BAR0_REGION_INDEX);
	errno = 0;
	if (pread(edu->fd, &command, 2, edu->config + 4) != 2)
		edu_fail("reading the PCI command register");
	command |= 0x6; /* memory space, bus master */
	if (pwrite(edu->fd, &command, 2, edu->config + 4) != 2)
		edu_fail("writing the PCI command register");
	if (edu_rd32(edu, EDU_ID) != EDU_ID_VALUE) {
		errno = 0;
		edu_fail("BAR0 register 0 is not the edu id");
	}
}

static uint64_t edu_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* One transfer of EDU_LENGTH bytes; polls (bounded) until the device
 * clears the start bit. */
static void edu_dma(const struct edu *edu, uint32_t src, uint32_t dst, uint32_t cmd)
{
	uint64_t deadline;

	edu_wr32(edu, EDU_DMA_SRC, src);
	edu_wr32(edu, EDU_DMA_DST, dst);
	edu_wr32(edu, EDU_DMA_COUNT, EDU_LENGTH);
	edu_wr32(edu, EDU_DMA_CMD, EDU_DMA_START | cmd);
	deadline = edu_now_ms() + EDU_WAIT_MS;
	while (edu_rd32(edu, EDU_DMA_CMD) & EDU_DMA_START) {
		if (edu_now_ms() > deadline) {
			errno = 0;
			edu_fail("the device did not finish a transfer within %d ms",
				 EDU_WAIT_MS);
		}
		usleep(1000);
	}
}

#endif
