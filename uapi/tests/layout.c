/* SPDX-License-Identifier: Apache-2.0 OR MIT */
/*
 * Prints the layout of include/linux/ioasid.h as the C compiler sees it:
 *   struct <name> <sizeof>
 *   field <struct> <field> <offsetof> <sizeof>
 *   const <NAME> <value, decimal>
 * Both the Rust test (uapi/tests/layout.rs) and the Python test
 * (tests/host/test_abi_layout.py) compile and run it and compare the
 * output with their mirror; both also check that every struct and macro
 * of the header appears here, so this list cannot silently fall behind.
 */
#include <stddef.h>
#include <stdio.h>

#include <linux/ioasid.h>

#define S(T) printf("struct %s %zu\n", #T, sizeof(struct T))
#define F(T, f)                                                         \
	printf("field %s %s %zu %zu\n", #T, #f, offsetof(struct T, f),  \
	       sizeof(((struct T *)0)->f))
#define C(N) printf("const %s %llu\n", #N, (unsigned long long)(N))

int main(void)
{
	S(ioasid_register_memory);
	F(ioasid_register_memory, argsz);
	F(ioasid_register_memory, flags);
	F(ioasid_register_memory, vaddr);
	F(ioasid_register_memory, size);

	S(ioasid_info);
	F(ioasid_info, argsz);
	F(ioasid_info, flags);
	F(ioasid_info, ioasid);
	F(ioasid_info, cap_offset);
	F(ioasid_info, pgsize_bitmap);

	S(ioasid_info_cap_header);
	F(ioasid_info_cap_header, id);
	F(ioasid_info_cap_header, version);
	F(ioasid_info_cap_header, next);

	S(ioasid_iova_range);
	F(ioasid_iova_range, start);
	F(ioasid_iova_range, last);

	S(ioasid_info_cap_iova_ranges);
	F(ioasid_info_cap_iova_ranges, header);
	F(ioasid_info_cap_iova_ranges, nr_ranges);
	F(ioasid_info_cap_iova_ranges, __reserved);

	S(ioasid_info_cap_nesting);
	F(ioasid_info_cap_nesting, header);
	F(ioasid_info_cap_nesting, flags);
	F(ioasid_info_cap_nesting, levels);

	S(ioasid_pgtable_format_desc);
	F(ioasid_pgtable_format_desc, format);
	F(ioasid_pgtable_format_desc, flags);
	F(ioasid_pgtable_format_desc, addr_width);
	F(ioasid_pgtable_format_desc, __reserved);
	F(ioasid_pgtable_format_desc, pgsize_bitmap);

	S(ioasid_info_cap_pgtable_formats);
	F(ioasid_info_cap_pgtable_formats, header);
	F(ioasid_info_cap_pgtable_formats, nr_formats);
	F(ioasid_info_cap_pgtable_formats, __reserved);

	S(ioasid_info_cap_pasid);
	F(ioasid_info_cap_pasid, header);
	F(ioasid_info_cap_pasid, flags);
	F(ioasid_info_cap_pasid, pasid_bits);
	F(ioasid_info_cap_pasid, pasid_table_format);
	F(ioasid_info_cap_pasid, __reserved);

	S(ioasid_info_cap_parent);
	F(ioasid_info_cap_parent, header);
	F(ioasid_info_cap_parent, parent);
	F(ioasid_info_cap_parent, __reserved);

	S(ioasid_info_cap_dma_avail);
	F(ioasid_info_cap_dma_avail, header);
	F(ioasid_info_cap_dma_avail, avail);
	F(ioasid_info_cap_dma_avail, __reserved);

	S(ioasid_info_cap_shadow);
	F(ioasid_info_cap_shadow, header);
	F(ioasid_info_cap_shadow, flags);
	F(ioasid_info_cap_shadow, __reserved);
	F(ioasid_info_cap_shadow, shadow_entries);
	F(ioasid_info_cap_shadow, leaves);
	F(ioasid_info_cap_shadow, last_walk_leaves);
	F(ioasid_info_cap_shadow, last_walk_malformed);
	F(ioasid_info_cap_shadow, last_walk_tables);
	F(ioasid_info_cap_shadow, malformed);
	F(ioasid_info_cap_shadow, walks);
	F(ioasid_info_cap_shadow, pasid_entries);
	F(ioasid_info_cap_shadow, pasid_valid);
	F(ioasid_info_cap_shadow, pasid_bad);
	F(ioasid_info_cap_shadow, pasid_unreadable);
	F(ioasid_info_cap_shadow, pasid_leaves);
	F(ioasid_info_cap_shadow, pasid_malformed);

	S(ioasid_dma_map);
	F(ioasid_dma_map, argsz);
	F(ioasid_dma_map, flags);
	F(ioasid_dma_map, ioasid);
	F(ioasid_dma_map, __reserved);
	F(ioasid_dma_map, vaddr);
	F(ioasid_dma_map, iova);
	F(ioasid_dma_map, size);

	S(ioasid_dma_unmap);
	F(ioasid_dma_unmap, argsz);
	F(ioasid_dma_unmap, flags);
	F(ioasid_dma_unmap, ioasid);
	F(ioasid_dma_unmap, __reserved);
	F(ioasid_dma_unmap, iova);
	F(ioasid_dma_unmap, size);

	S(ioasid_bind_pgtable);
	F(ioasid_bind_pgtable, argsz);
	F(ioasid_bind_pgtable, flags);
	F(ioasid_bind_pgtable, ioasid);
	F(ioasid_bind_pgtable, format);
	F(ioasid_bind_pgtable, addr_width);
	F(ioasid_bind_pgtable, __reserved);
	F(ioasid_bind_pgtable, pgtable);

	S(ioasid_unbind_pgtable);
	F(ioasid_unbind_pgtable, argsz);
	F(ioasid_unbind_pgtable, flags);
	F(ioasid_unbind_pgtable, ioasid);
	F(ioasid_unbind_pgtable, __reserved);

	S(ioasid_bind_pasid_table);
	F(ioasid_bind_pasid_table, argsz);
	F(ioasid_bind_pasid_table, flags);
	F(ioasid_bind_pasid_table, ioasid);
	F(ioasid_bind_pasid_table, format);
	F(ioasid_bind_pasid_table, table);
	F(ioasid_bind_pasid_table, entries);
	F(ioasid_bind_pasid_table, __reserved);

	S(ioasid_unbind_pasid_table);
	F(ioasid_unbind_pasid_table, argsz);
	F(ioasid_unbind_pasid_table, flags);
	F(ioasid_unbind_pasid_table, ioasid);
	F(ioasid_unbind_pasid_table, __reserved);

	S(ioasid_invalidate_cache);
	F(ioasid_invalidate_cache, argsz);
	F(ioasid_invalidate_cache, flags);
	F(ioasid_invalidate_cache, ioasid);
	F(ioasid_invalidate_cache, pasid);
	F(ioasid_invalidate_cache, addr);
	F(ioasid_invalidate_cache, size);

	S(vfio_attach_ioasid);
	F(vfio_attach_ioasid, argsz);
	F(vfio_attach_ioasid, flags);
	F(vfio_attach_ioasid, ioasid);
	F(vfio_attach_ioasid, user_pasid);

	C(IOASID_TYPE);
	C(IOASID_BASE);
	C(IOASID_MAX_ID);
	C(IOASID_PASID_BITS);
	C(IOASID_PASID_TABLE_MAX_ENTRIES);

	C(IOASID_EXT_TYPE1V2_DMA);
	C(IOASID_EXT_REGISTER_MEMORY);
	C(IOASID_EXT_NESTING_SOFTWARE);
	C(IOASID_EXT_NESTING_HARDWARE);
	C(IOASID_EXT_BIND_PGTABLE_SHADOW);
	C(IOASID_EXT_BIND_PASID_TABLE_SHADOW);
	C(IOASID_EXT_USER_PASID_TRACKED);
	C(IOASID_EXT_PASID_DMA_ROUTING);

	C(IOASID_CHECK_EXTENSION);
	C(IOASID_REGISTER_MEMORY);
	C(IOASID_UNREGISTER_MEMORY);
	C(IOASID_ALLOC);
	C(IOASID_FREE);
	C(IOASID_GET_INFO);
	C(IOASID_MAP_DMA);
	C(IOASID_UNMAP_DMA);
	C(IOASID_CREATE_NESTING);
	C(IOASID_BIND_PGTABLE);
	C(IOASID_UNBIND_PGTABLE);
	C(IOASID_BIND_PASID_TABLE);
	C(IOASID_UNBIND_PASID_TABLE);
	C(IOASID_INVALIDATE_CACHE);
	C(IOASID_DAEMON_IDENTIFY);

	C(IOASID_INFO_PGSIZES);
	C(IOASID_INFO_CAPS);
	C(IOASID_INFO_MAP_DMA);
	C(IOASID_INFO_BIND_PGTABLE);
	C(IOASID_INFO_BIND_PASID_TABLE);
	C(IOASID_INFO_NESTED);
	C(IOASID_INFO_CAP_IOVA_RANGES);
	C(IOASID_INFO_CAP_NESTING);
	C(IOASID_INFO_CAP_PGTABLE_FORMATS);
	C(IOASID_INFO_CAP_PASID);
	C(IOASID_INFO_CAP_PARENT);
	C(IOASID_INFO_CAP_DMA_AVAIL);
	C(IOASID_INFO_CAP_SHADOW);
	C(IOASID_NESTING_SOFTWARE);
	C(IOASID_NESTING_HARDWARE);
	C(IOASID_PGTABLE_FORMAT_SHADOWED);
	C(IOASID_PASID_ATTACH_TRACKED);
	C(IOASID_PASID_DMA_ROUTED);
	C(IOASID_SHADOW_PGTABLE);
	C(IOASID_SHADOW_PASID_TABLE);
	C(IOASID_SHADOW_TRUNCATED);

	C(IOASID_DMA_MAP_FLAG_READ);
	C(IOASID_DMA_MAP_FLAG_WRITE);
	C(IOASID_DMA_UNMAP_FLAG_ALL);
	C(IOASID_PGTABLE_X86_64_4LVL);
	C(IOASID_PASID_TABLE_FLAT_X86_64);
	C(IOASID_INVALIDATE_ADDR);
	C(IOASID_INVALIDATE_PASID);
	C(IOASID_INVALIDATE_PASID_CACHE);

	C(VFIO_TYPE);
	C(VFIO_BASE);
	C(VFIO_BIND_IOASID_FD);
	C(VFIO_UNBIND_IOASID_FD);
	C(IOASID_ATTACH_USER_PASID);
	C(VFIO_ATTACH_IOASID);
	C(VFIO_DETACH_IOASID);
	return 0;
}
