//! sysfs scan of PCI functions (vendor, device, class, driver, IOMMU group, NUMA node) and
//! binding to `vfio-pci`. Not implemented yet in this commit.
